//! Upstream addresses: a parsed `target` URL, a dispatch destination or a service endpoint, and the join of its
//! path prefix with the request's path and query.
//!
//! Parsing happens once per policy load for destinations and endpoints, and once per request for a `target`
//! header; joining is allocation-free when the upstream has no path prefix and no query of its own.

use std::fmt;

use actix_http::Uri;
use actix_http::header::HeaderValue;
use actix_http::uri::{Authority, Parts, PathAndQuery, Scheme};

/// Where a request goes: scheme and authority, plus an optional path prefix and query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    scheme: Scheme,
    authority: Authority,
    /// The `Host` header value for this upstream: its authority.
    host: HeaderValue,
    /// The target's path as written, empty when it had none or only `/`.
    prefix: Box<str>,
    /// The target's own query, merged before the request's.
    query: Option<Box<str>>,
}

impl Upstream {
    /// Parses an absolute `http` or `https` URL (scheme case-insensitive).
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        let text = text.trim();
        let uri: Uri = text
            .parse()
            .map_err(|_| "must be an absolute http or https URL")?;
        Self::from_uri(uri)
    }

    /// Parses a service endpoint: `host:port`, or an `http`/`https` URL with no path.
    pub fn parse_endpoint(text: &str) -> Result<Self, &'static str> {
        let text = text.trim();
        let upstream = if text.contains("://") {
            Self::parse(text)?
        } else {
            let authority: Authority = text
                .parse()
                .map_err(|_| "must be host:port or an http(s) URL")?;
            if authority.port_u16().is_none() {
                return Err("must be host:port (the port is required)");
            }
            Self::from_parts(Scheme::HTTP, authority, "", None)?
        };
        if !upstream.prefix.is_empty() || upstream.query.is_some() {
            return Err("an endpoint has no path or query");
        }
        Ok(upstream)
    }

    fn from_uri(uri: Uri) -> Result<Self, &'static str> {
        let parts = uri.into_parts();
        let scheme = match parts.scheme {
            Some(s) if s == Scheme::HTTP || s == Scheme::HTTPS => s,
            _ => return Err("must be an absolute http or https URL"),
        };
        let authority = parts
            .authority
            .ok_or("must be an absolute http or https URL")?;
        let (path, query) = match &parts.path_and_query {
            Some(pq) => (pq.path(), pq.query()),
            None => ("", None),
        };
        Self::from_parts(scheme, authority, path, query)
    }

    fn from_parts(
        scheme: Scheme,
        authority: Authority,
        path: &str,
        query: Option<&str>,
    ) -> Result<Self, &'static str> {
        if authority.as_str().contains('@') {
            return Err("credentials in the URL are not supported");
        }
        if authority.host().is_empty() {
            return Err("the URL has no host");
        }
        let host =
            HeaderValue::from_str(authority.as_str()).map_err(|_| "the host is not valid")?;
        let prefix = if path == "/" { "" } else { path };
        Ok(Self {
            scheme,
            authority,
            host,
            prefix: prefix.into(),
            query: query.filter(|q| !q.is_empty()).map(Into::into),
        })
    }

    /// The same endpoint reached over TLS (a peer sidecar's inbound listener).
    pub fn into_https(self) -> Self {
        Self {
            scheme: Scheme::HTTPS,
            ..self
        }
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The host, without the port (an IPv6 address keeps its brackets).
    pub fn host(&self) -> &str {
        self.authority.host()
    }

    /// The `Host` header value: the upstream's authority.
    pub fn host_header(&self) -> &HeaderValue {
        &self.host
    }

    pub fn is_https(&self) -> bool {
        self.scheme == Scheme::HTTPS
    }

    /// The upstream URI for a request: this upstream's prefix joined with the request's path, queries merged
    /// (the upstream's first), everything else byte for byte.
    ///
    /// With `target: http://orders:8080/api`, `/items?id=7` becomes `/api/items?id=7` and `/` becomes `/api`.
    pub fn uri_for(&self, request: &Uri) -> Result<Uri, &'static str> {
        let req_pq = request.path_and_query();
        let path_and_query = if self.prefix.is_empty() && self.query.is_none() {
            match req_pq {
                Some(pq) => pq.clone(),
                None => PathAndQuery::from_static("/"),
            }
        } else {
            let (path, query) = match req_pq {
                Some(pq) => (pq.path(), pq.query()),
                None => ("/", None),
            };
            let mut out = String::with_capacity(
                self.prefix.len()
                    + path.len()
                    + self.query.as_deref().map_or(0, |q| q.len() + 1)
                    + query.map_or(0, |q| q.len() + 1),
            );
            if self.prefix.is_empty() {
                out.push_str(path);
            } else if path == "/" || path.is_empty() || path == "*" {
                out.push_str(&self.prefix);
            } else {
                out.push_str(self.prefix.strip_suffix('/').unwrap_or(&self.prefix));
                if !path.starts_with('/') {
                    out.push('/');
                }
                out.push_str(path);
            }
            match (self.query.as_deref(), query) {
                (Some(a), Some(b)) if !b.is_empty() => {
                    out.push('?');
                    out.push_str(a);
                    out.push('&');
                    out.push_str(b);
                }
                (Some(q), _) | (None, Some(q)) => {
                    out.push('?');
                    out.push_str(q);
                }
                (None, None) => {}
            }
            PathAndQuery::from_maybe_shared(out).map_err(|_| "the joined path is not valid")?
        };
        let mut parts = Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path_and_query);
        Uri::from_parts(parts).map_err(|_| "the upstream URI is not valid")
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.prefix)?;
        if let Some(q) = &self.query {
            write!(f, "?{q}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(target: &str, request: &str) -> String {
        let up = Upstream::parse(target).unwrap();
        up.uri_for(&request.parse().unwrap()).unwrap().to_string()
    }

    #[test]
    fn the_target_path_is_a_prefix() {
        assert_eq!(
            join("http://orders:8080/api", "/items?id=7"),
            "http://orders:8080/api/items?id=7"
        );
        assert_eq!(
            join("http://orders:8080/api", "/"),
            "http://orders:8080/api"
        );
        assert_eq!(
            join("http://orders:8080/api/", "/items"),
            "http://orders:8080/api/items"
        );
        assert_eq!(
            join("http://orders:8080/api/", "/"),
            "http://orders:8080/api/"
        );
    }

    #[test]
    fn without_prefix_the_request_path_passes_byte_for_byte() {
        assert_eq!(
            join("http://h:1", "/a%2Fb/../c?x=%20&y"),
            "http://h:1/a%2Fb/../c?x=%20&y"
        );
        assert_eq!(join("http://h:1/", "/"), "http://h:1/");
    }

    #[test]
    fn queries_merge_target_first() {
        assert_eq!(join("http://h/p?k=1", "/x?a=2"), "http://h/p/x?k=1&a=2");
        assert_eq!(join("http://h/p?k=1", "/x"), "http://h/p/x?k=1");
    }

    #[test]
    fn the_scheme_is_case_insensitive() {
        let up = Upstream::parse("HTTP://Orders:8080/api").unwrap();
        assert!(!up.is_https());
        assert_eq!(up.host_header(), "Orders:8080");
        assert!(Upstream::parse("HttpS://h").unwrap().is_https());
    }

    #[test]
    fn only_absolute_http_urls_are_targets() {
        for bad in [
            "orders",
            "/path",
            "ftp://h/x",
            "http://user:pw@h/",
            "",
            "http://",
        ] {
            assert!(Upstream::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn endpoints_are_host_and_port() {
        assert_eq!(
            Upstream::parse_endpoint("10.0.0.1:8080")
                .unwrap()
                .to_string(),
            "http://10.0.0.1:8080"
        );
        assert!(
            Upstream::parse_endpoint("https://h:8443")
                .unwrap()
                .is_https()
        );
        assert!(Upstream::parse_endpoint("orders").is_err());
        assert!(Upstream::parse_endpoint("http://h:1/api").is_err());
    }
}
