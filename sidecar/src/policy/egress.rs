//! The `egress` section: what the app may reach by URL, and which roots verify `https` targets.
//!
//! Owns: the allow-list (host names and patterns, CIDRs) and its matching, and the trust-root choice. Does not
//! own: where they are applied ([`crate::dispatch::route`], [`crate::dispatch::client::tls_config`]).

use std::net::IpAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// The `egress` section as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEgress {
    allow: Option<RawAllowList>,
    #[serde(default)]
    tls: RawEgressTls,
    /// Copies of URL targets, by the URL of their authority (checked with the policy's services).
    #[serde(default)]
    pub(super) shadow: std::collections::BTreeMap<String, Vec<super::copies::RawCopy>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllowList {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    cidrs: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEgressTls {
    roots: Option<String>,
    ca: Option<String>,
}

/// The validated `egress` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Egress {
    /// When set, URL targets must match it; without it every URL target is allowed.
    pub allow: Option<AllowList>,
    pub roots: Roots,
}

/// The certificates `https` URL targets are verified against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Roots {
    /// Mozilla's roots, compiled in: the same everywhere, also in an image with no CA bundle.
    #[default]
    Builtin,
    /// The machine's bundle (`SSL_CERT_FILE`, `SSL_CERT_DIR`, or the platform's usual paths).
    System,
    /// A PEM bundle of the operator's (a private CA), and nothing else.
    Bundle(PathBuf),
}

/// The hosts URL targets may name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    hosts: Vec<HostPattern>,
    cidrs: Vec<Cidr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// `api.example.com`: that name.
    Exact(String),
    /// `*.example.com`: any name under it (not `example.com` itself), like a certificate wildcard but any
    /// depth.
    Suffix(String),
}

/// An address block: `10.0.0.0/8`, `2001:db8::/32`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let net: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR block"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?,
            None => max,
        };
        Ok(Self { net, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let bits = |a: IpAddr| -> (u128, u32) {
            match a {
                IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
                IpAddr::V6(v6) => (u128::from(v6), 128),
            }
        };
        let ((net, width), (addr, addr_width)) = (bits(self.net), bits(ip));
        if width != addr_width {
            return false;
        }
        let shift = width - u32::from(self.prefix);
        shift >= width || (net >> shift) == (addr >> shift)
    }
}

impl AllowList {
    /// Whether a URL target's host is allowed: a name matching `hosts`, or an IP address inside `cidrs` (an
    /// address written in `hosts` is kept there as a one-address block). Names are matched as written, not by
    /// what they resolve to.
    pub fn permits(&self, host: &str) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<IpAddr>() {
            return self.cidrs.iter().any(|c| c.contains(ip));
        }
        let host = host.trim_end_matches('.');
        self.hosts.iter().any(|pattern| match pattern {
            HostPattern::Exact(name) => host.eq_ignore_ascii_case(name),
            HostPattern::Suffix(suffix) => {
                host.len() > suffix.len()
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        })
    }
}

/// Validates the section; each problem is `(field, reason)`.
pub(super) fn validate(raw: &RawEgress) -> Result<Egress, Vec<(String, String)>> {
    let mut issues = Vec::new();
    let allow = raw.allow.as_ref().map(|a| {
        let mut list = AllowList::default();
        for (i, text) in a.hosts.iter().enumerate() {
            let text = text.trim().trim_end_matches('.').to_ascii_lowercase();
            if let Ok(ip) = text.trim_matches(['[', ']']).parse::<IpAddr>() {
                list.cidrs.push(Cidr {
                    net: ip,
                    prefix: if ip.is_ipv4() { 32 } else { 128 },
                });
                continue;
            }
            let (pattern, name) = match text.strip_prefix("*.") {
                Some(rest) => (HostPattern::Suffix(rest.to_string()), rest.to_string()),
                None => (HostPattern::Exact(text.clone()), text.clone()),
            };
            let valid = !name.is_empty()
                && name
                    .split('.')
                    .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
            if valid {
                list.hosts.push(pattern);
            } else {
                issues.push((
                    format!("egress.allow.hosts[{i}]"),
                    format!("{text:?} must be a host name (api.example.com), a pattern (*.example.com) or an IP address"),
                ));
            }
        }
        for (i, text) in a.cidrs.iter().enumerate() {
            match Cidr::parse(text) {
                Ok(c) => list.cidrs.push(c),
                Err(why) => issues.push((format!("egress.allow.cidrs[{i}]"), why)),
            }
        }
        list
    });
    let roots = match (raw.tls.roots.as_deref().map(str::trim), &raw.tls.ca) {
        (Some("builtin") | None, None) => Roots::Builtin,
        (Some("system"), None) => Roots::System,
        (None | Some("bundle"), Some(ca)) => Roots::Bundle(PathBuf::from(ca)),
        (Some("builtin" | "system"), Some(_)) => {
            issues.push((
                "egress.tls.ca".into(),
                "a bundle replaces the roots: drop `roots`, or set it to `bundle`".into(),
            ));
            Roots::Builtin
        }
        (Some("bundle"), None) => {
            issues.push((
                "egress.tls.ca".into(),
                "is required with `roots: bundle`: the PEM file of the CAs to trust".into(),
            ));
            Roots::Builtin
        }
        (Some(other), _) => {
            issues.push((
                "egress.tls.roots".into(),
                format!("must be builtin, system or bundle, got {other:?}"),
            ));
            Roots::Builtin
        }
    };
    if issues.is_empty() {
        Ok(Egress { allow, roots })
    } else {
        Err(issues)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(hosts: &[&str], cidrs: &[&str]) -> AllowList {
        let raw = RawEgress {
            allow: Some(RawAllowList {
                hosts: hosts.iter().map(|s| s.to_string()).collect(),
                cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
            }),
            tls: RawEgressTls::default(),
            shadow: Default::default(),
        };
        validate(&raw).unwrap().allow.unwrap()
    }

    #[test]
    fn names_match_exactly_or_under_a_wildcard_whatever_their_case() {
        let allow = list(&["api.example.com", "*.internal.example"], &[]);
        assert!(allow.permits("api.example.com"));
        assert!(allow.permits("API.Example.com."));
        assert!(!allow.permits("evil.api.example.com"));
        assert!(!allow.permits("api.example.com.evil"));
        assert!(allow.permits("db.internal.example"));
        assert!(allow.permits("a.b.internal.example"));
        assert!(!allow.permits("internal.example"));
        assert!(!allow.permits("xinternal.example"));
    }

    #[test]
    fn addresses_match_cidrs_and_names_never_do() {
        let allow = list(
            &["192.0.2.7"],
            &["10.0.0.0/8", "2001:db8::/32", "127.0.0.1"],
        );
        assert!(allow.permits("10.1.2.3"));
        assert!(!allow.permits("11.0.0.1"));
        assert!(allow.permits("127.0.0.1"));
        assert!(!allow.permits("127.0.0.2"));
        assert!(allow.permits("[2001:db8::1]"));
        assert!(!allow.permits("[2001:db9::1]"));
        assert!(
            allow.permits("::ffff:10.0.0.1"),
            "IPv4-mapped addresses are IPv4"
        );
        assert!(allow.permits("192.0.2.7"));
        assert!(!allow.permits("localhost"));
        assert!(list(&[], &["0.0.0.0/0"]).permits("203.0.113.9"));
    }

    #[test]
    fn bad_entries_name_their_field() {
        let raw = RawEgress {
            allow: Some(RawAllowList {
                hosts: vec!["ok.example".into(), "bad host".into()],
                cidrs: vec!["10.0.0.0/33".into(), "nope".into()],
            }),
            tls: RawEgressTls {
                roots: Some("mozilla".into()),
                ca: None,
            },
            shadow: Default::default(),
        };
        let fields: Vec<String> = validate(&raw)
            .unwrap_err()
            .into_iter()
            .map(|(f, _)| f)
            .collect();
        assert_eq!(
            fields,
            [
                "egress.allow.hosts[1]",
                "egress.allow.cidrs[0]",
                "egress.allow.cidrs[1]",
                "egress.tls.roots"
            ]
        );
    }
}
