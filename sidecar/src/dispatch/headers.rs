//! Header hygiene at the proxy boundary: hop-by-hop headers (RFC 9110 §7.6.1), the sidecar's own headers, and
//! header names spelled with underscores on the mesh hop.
//!
//! CGI, WSGI, PHP and Rack turn `x-sidecar-peer-identity` and `x_sidecar_peer_identity` into the same
//! `HTTP_X_SIDECAR_PEER_IDENTITY`, so an underscore spelling of one of the sidecar's own headers is removed
//! wherever the sidecar removes its own headers, always.

use actix_http::header::{
    self, CONNECTION, EXPECT, HeaderMap, HeaderName, HeaderValue, TE, TRAILER, TRANSFER_ENCODING,
    UPGRADE,
};

/// Names the app's target: a URL, or a service name with `internal: true`.
pub const TARGET: HeaderName = HeaderName::from_static("target");
/// `true` when `target` names a service of the registry.
pub const INTERNAL: HeaderName = HeaderName::from_static("internal");
/// Names the fan-out group a request goes to (every target of it).
pub const FANOUT: HeaderName = HeaderName::from_static("fanout");
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
/// `Expect: 100-continue` (the sidecar's listener already answered it to the app). The underscore spellings
/// of the sidecar's own headers (`x_sidecar_peer_identity`, `x-sidecar_peer-identity`, ...) go too.
pub fn strip_request(headers: &mut HeaderMap) {
    let expect_continue = headers
        .get(EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    strip(headers, |name| {
        *name == TARGET
            || *name == INTERNAL
            || *name == FANOUT
            || (expect_continue && *name == EXPECT)
            || is_own_underscore_spelling(name)
    });
}

/// A name with `_` that reads `x-sidecar-...` once underscores are read as hyphens.
fn is_own_underscore_spelling(name: &HeaderName) -> bool {
    const OWN: &[u8] = b"x-sidecar-";
    let name = name.as_str().as_bytes();
    name.len() > OWN.len()
        && name.contains(&b'_')
        && name
            .iter()
            .zip(OWN)
            .all(|(&b, &own)| b == own || (own == b'-' && b == b'_'))
}

pub use crate::policy::http::UnderscoreAction;

pub use crate::telemetry::names::HEADERS_DROPPED;

/// Applies `action` to the header names with `_`: `Err` with the first such name when the action is
/// [`UnderscoreAction::Reject`]. Costs one scan of the names; nothing is allocated when none has `_`.
pub fn underscores(
    headers: &mut HeaderMap,
    action: UnderscoreAction,
    direction: &'static str,
) -> Result<(), HeaderName> {
    let has = |name: &HeaderName| name.as_str().contains('_');
    match action {
        UnderscoreAction::Allow => Ok(()),
        UnderscoreAction::Reject => match headers.keys().find(|n| has(n)) {
            Some(name) => Err(name.clone()),
            None => Ok(()),
        },
        UnderscoreAction::Drop => {
            if headers.keys().any(has) {
                let before = headers.len();
                headers.retain(|name, _| !has(name));
                metrics::counter!(HEADERS_DROPPED, "direction" => direction, "reason" => "underscore")
                    .increment((before - headers.len()) as u64);
            }
            Ok(())
        }
    }
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
    fn underscore_spellings_of_the_sidecars_headers_always_go() {
        let mut h = map(&[
            ("x_sidecar_peer_identity", "spoof"),
            ("x-sidecar_peer-identity", "spoof"),
            ("x-sidecar-peer_identity", "spoof"),
            (
                "x-sidecar-peer-identity",
                "kept: the inbound listener overwrites it",
            ),
            ("x_sidecar", "kept: not one of ours"),
            ("x_user_id", "kept: the mesh hop decides"),
            ("x-sidecarish_thing", "kept"),
        ]);
        strip_request(&mut h);
        let mut left: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [
                "x-sidecar-peer-identity",
                "x-sidecarish_thing",
                "x_sidecar",
                "x_user_id"
            ]
        );
    }

    #[test]
    fn underscore_names_are_dropped_refused_or_allowed() {
        let pairs = [("x_user", "1"), ("x-user", "2"), ("accept", "*/*")];
        let mut h = map(&pairs);
        assert!(underscores(&mut h, UnderscoreAction::Drop, "inbound").is_ok());
        assert_eq!(h.len(), 2);
        assert!(!h.contains_key("x_user"));
        let mut h = map(&pairs);
        let refused = underscores(&mut h, UnderscoreAction::Reject, "inbound").unwrap_err();
        assert_eq!(refused.as_str(), "x_user");
        let mut h = map(&pairs);
        assert!(underscores(&mut h, UnderscoreAction::Allow, "inbound").is_ok());
        assert_eq!(h.len(), 3);
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
