//! Header hygiene at the proxy boundary: hop-by-hop headers (RFC 9110 §7.6.1) and the sidecar's own headers.

use actix_http::header::{
    self, CONNECTION, EXPECT, HeaderMap, HeaderName, HeaderValue, TE, TRAILER, TRANSFER_ENCODING,
    UPGRADE,
};

/// Names the app's target: a URL, or a service name with `internal: true`.
pub const TARGET: HeaderName = HeaderName::from_static("target");
/// `true` when `target` names a service of the registry.
pub const INTERNAL: HeaderName = HeaderName::from_static("internal");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop headers that never cross the sidecar, in either direction (RFC 9110 §7.6.1).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == CONNECTION
        || *name == KEEP_ALIVE
        || *name == PROXY_CONNECTION
        || *name == TE
        || *name == TRAILER
        || *name == TRANSFER_ENCODING
        || *name == UPGRADE
        || *name == header::PROXY_AUTHORIZATION
        || *name == header::PROXY_AUTHENTICATE
}

/// Header names listed in `Connection` beyond the usual `close` and `keep-alive` (rare: usually empty, and
/// then nothing is allocated).
fn named_by_connection(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut named = Vec::new();
    for value in headers.get_all(CONNECTION) {
        for token in value.as_bytes().split(|&b| b == b',') {
            let token = token.trim_ascii();
            if token.is_empty()
                || token.eq_ignore_ascii_case(b"close")
                || token.eq_ignore_ascii_case(b"keep-alive")
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token) {
                named.push(name);
            }
        }
    }
    named
}

/// Removes `Connection`, every header it names, and the fixed hop-by-hop set, in one pass.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip(headers, |_| false);
}

fn strip(headers: &mut HeaderMap, also: impl Fn(&HeaderName) -> bool) {
    let named = named_by_connection(headers);
    headers.retain(|name, _| !(is_hop_by_hop(name) || also(name) || named.contains(name)));
}

/// Prepares an app request's headers for the upstream: hop-by-hop and sidecar headers go, and so does
/// `Expect: 100-continue` (the sidecar's listener already answered it to the app).
pub fn strip_request(headers: &mut HeaderMap) {
    let expect_continue = headers
        .get(EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    strip(headers, |name| {
        *name == TARGET || *name == INTERNAL || (expect_continue && *name == EXPECT)
    });
}

/// Appends the client address to `X-Forwarded-For`, joining earlier values into one header as the seed
/// dispatcher (Go's reverse proxy) does.
pub fn append_forwarded_for(headers: &mut HeaderMap, client: std::net::IpAddr) {
    use std::fmt::Write;
    const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    let mut value = String::with_capacity(64);
    for earlier in headers.get_all(&XFF) {
        if let Ok(text) = earlier.to_str() {
            value.push_str(text);
            value.push_str(", ");
        }
    }
    let _infallible = write!(value, "{client}");
    if let Ok(v) = HeaderValue::try_from(value) {
        headers.insert(XFF, v);
    }
}

/// The size of a request head as it arrived: request line plus every header line.
pub fn head_size(head: &actix_http::RequestHead) -> usize {
    let uri = head.uri.path_and_query().map_or(1, |p| p.as_str().len())
        + head.uri.authority().map_or(0, |a| a.as_str().len() + 8);
    let line = head.method.as_str().len() + uri + 12;
    head.headers
        .iter()
        .fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn connection_and_the_headers_it_names_are_removed() {
        let mut h = map(&[
            ("connection", "close, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "basic x"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
        ]);
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(left, [("set-cookie", "a=1"), ("set-cookie", "b=2")]);
    }

    #[test]
    fn forwarded_for_appends_to_earlier_hops() {
        let mut h = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
        ]);
        append_forwarded_for(&mut h, "127.0.0.1".parse().unwrap());
        assert_eq!(
            h.get("x-forwarded-for").unwrap(),
            "10.0.0.1, 10.0.0.2, 127.0.0.1"
        );
    }
}
