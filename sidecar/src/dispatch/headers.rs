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

/// Hop-by-hop headers that never cross the sidecar, in either direction.
const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// Removes `Connection`, every header it names, and the fixed hop-by-hop set.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Prepares an app request's headers for the upstream: hop-by-hop and sidecar headers go, `Expect:
/// 100-continue` goes too (the sidecar's listener already answered it to the app).
pub fn strip_request(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    headers.remove(TARGET);
    headers.remove(INTERNAL);
    if headers
        .get(EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
    {
        headers.remove(EXPECT);
    }
}

/// Appends the client address to `X-Forwarded-For`, joining earlier values into one header as the seed
/// dispatcher (Go's reverse proxy) does.
pub fn append_forwarded_for(headers: &mut HeaderMap, client: std::net::IpAddr) {
    const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    let client = client.to_string();
    let value = if headers.contains_key(&XFF) {
        let mut joined = String::new();
        for v in headers.get_all(&XFF) {
            if let Ok(v) = v.to_str() {
                joined.push_str(v);
                joined.push_str(", ");
            }
        }
        joined.push_str(&client);
        joined
    } else {
        client
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
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
