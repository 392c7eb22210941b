//! Dispatch rules in the seed dispatcher's format, accepted exactly as its users write them:
//!
//! ```yaml
//! key: environment              # request header that selects a rewrite
//! destination: http://example.org
//! rewrites:
//!   dev:                        # value of the header
//!     patch:                    # headers to set, replacing any the request has
//!       - key: Host
//!         val: example.com
//!       - key: dispatched
//!         val: true             # YAML booleans and numbers become their text
//!     destination: http://example.com   # optional; the top-level destination otherwise
//! ```
//!
//! The same mapping is accepted standalone (a seed `config.yaml`, named by `SIDECAR_CONFIG`) and under
//! `dispatch:` in a policy file.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use actix_http::header::{HeaderName, HeaderValue};
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use super::errors::{Issue, PolicyErrors, Sources, yaml_error};
use crate::fxhash::FxHashMap;
use crate::upstream::Upstream;

/// Compiled dispatch rules: header lookups and pre-parsed destinations, ready for the request path.
#[derive(Debug, Clone)]
pub struct DispatchRules {
    /// The header whose value selects a rewrite; `None` when only a default destination is configured.
    pub key: Option<HeaderName>,
    /// Where requests go when no rewrite matches: the top-level `destination`, no patch.
    pub default: Arc<Rewrite>,
    /// Rewrites by exact header value.
    pub rewrites: FxHashMap<Box<[u8]>, Arc<Rewrite>>,
}

/// One rewrite: headers to set and where to send the request.
#[derive(Debug)]
pub struct Rewrite {
    /// Shared with every request sent there: routing one costs a reference count, not a copy.
    pub destination: Arc<Upstream>,
    pub patch: Vec<(HeaderName, HeaderValue)>,
    /// Copies of the requests this rewrite routes (`shadow`).
    pub copies: Option<super::copies::Copies>,
}

impl DispatchRules {
    /// Picks the rewrite for a request: the one named by the key header's value, or the default.
    pub fn select(&self, headers: &actix_http::header::HeaderMap) -> &Arc<Rewrite> {
        self.key
            .as_ref()
            .and_then(|k| headers.get(k))
            .and_then(|v| self.rewrites.get(v.as_bytes()))
            .unwrap_or(&self.default)
    }

    /// Parses the seed dispatcher format.
    pub fn from_seed_yaml(source: &str, text: &str) -> Result<Self, PolicyErrors> {
        let raw: RawDispatch = super::prescan::check_depth(source, text)
            .and_then(|()| yaml_serde::from_str(text).map_err(|e| yaml_error(source, &e)))?;
        raw.validate(source, "")
            .map_err(|issues| PolicyErrors::render(issues, &Sources::one(source, text)))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDispatch {
    key: Option<String>,
    destination: Option<String>,
    #[serde(default)]
    rewrites: Option<BTreeMap<Scalar, Option<RawRewrite>>>,
    #[serde(default)]
    shadow: Vec<super::copies::RawCopy>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRewrite {
    #[serde(default)]
    patch: Option<Vec<RawPatch>>,
    destination: Option<String>,
    /// The rewrite's copies; the top level's when not written (`shadow: []` copies nothing).
    shadow: Option<Vec<super::copies::RawCopy>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPatch {
    key: String,
    #[serde(default)]
    val: Scalar,
}

/// Any YAML scalar as its text: `true` is "true", `8080` is "8080", an empty value is "".
#[derive(Debug, Default, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Scalar(String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar(String::new()))
            }
            fn visit_none<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar(String::new()))
            }
        }
        d.deserialize_any(V)
    }
}

impl RawDispatch {
    /// Checks every field, collecting all problems; `prefix` is the field path of the mapping (`dispatch.` in a
    /// policy file, empty in a seed `config.yaml`).
    pub(super) fn validate(self, file: &str, prefix: &str) -> Result<DispatchRules, Vec<Issue>> {
        let mut issues = Vec::new();
        let at = |field: &str| format!("{prefix}{field}");
        let key = match self.key.as_deref() {
            Some(k) => match HeaderName::from_bytes(k.trim().as_bytes()) {
                Ok(h) => Some(h),
                Err(_) => {
                    issues.push(Issue::new(
                        file,
                        at("key"),
                        format!("not a valid header name, got {k:?}"),
                    ));
                    None
                }
            },
            None => None,
        };
        let rewrites_raw = self.rewrites.unwrap_or_default();
        if self.key.is_none() && !rewrites_raw.is_empty() {
            issues.push(Issue::new(
                file,
                at("key"),
                "required when rewrites are given (it names the header that selects one)",
            ));
        }
        let default = match self.destination.as_deref() {
            None | Some("") => {
                issues.push(Issue::new(
                    file,
                    at("destination"),
                    "required: config doesn't have any destination",
                ));
                None
            }
            Some(d) => match Upstream::parse(d) {
                Ok(u) => Some(Arc::new(u)),
                Err(why) => {
                    issues.push(Issue::new(
                        file,
                        at("destination"),
                        format!("{why}, got {d:?}"),
                    ));
                    None
                }
            },
        };

        let copies = super::copies::validate(&self.shadow, file, &at("shadow"), &mut issues);
        let mut rewrites =
            FxHashMap::with_capacity_and_hasher(rewrites_raw.len(), Default::default());
        for (value, rewrite) in rewrites_raw {
            let field = at(&format!("rewrites.{}", value.0));
            let rewrite = rewrite.unwrap_or_default();
            let mut patch = Vec::new();
            for (i, p) in rewrite.patch.unwrap_or_default().into_iter().enumerate() {
                let name = HeaderName::from_bytes(p.key.trim().as_bytes());
                let val = HeaderValue::from_str(&p.val.0);
                match (name, val) {
                    (Ok(n), Ok(v)) => {
                        // A later patch of the same header replaces an earlier one, as a dict update does.
                        patch.retain(|(k, _): &(HeaderName, HeaderValue)| *k != n);
                        patch.push((n, v));
                    }
                    (Err(_), _) => issues.push(Issue::new(
                        file,
                        format!("{field}.patch[{i}].key"),
                        format!("not a valid header name, got {:?}", p.key),
                    )),
                    (_, Err(_)) => issues.push(Issue::new(
                        file,
                        format!("{field}.patch[{i}].val"),
                        format!("not a valid header value, got {:?}", p.val.0),
                    )),
                }
            }
            let destination = match rewrite.destination.as_deref() {
                None => default.clone(),
                Some(d) => match Upstream::parse(d) {
                    Ok(u) => Some(Arc::new(u)),
                    Err(why) => {
                        issues.push(Issue::new(
                            file,
                            format!("{field}.destination"),
                            format!("{why}, got {d:?}"),
                        ));
                        None
                    }
                },
            };
            let own = match &rewrite.shadow {
                Some(list) => {
                    super::copies::validate(list, file, &format!("{field}.shadow"), &mut issues)
                }
                None => copies.clone(),
            };
            if let Some(destination) = destination {
                rewrites.insert(
                    value.0.into_bytes().into_boxed_slice(),
                    Arc::new(Rewrite {
                        destination,
                        patch,
                        copies: own,
                    }),
                );
            }
        }

        match default {
            Some(destination) if issues.is_empty() => Ok(DispatchRules {
                key,
                default: Arc::new(Rewrite {
                    destination,
                    patch: Vec::new(),
                    copies,
                }),
                rewrites,
            }),
            _ => Err(issues),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED_README_CONFIG: &str = "\
rewrites: # set of rewrite rules
  dev: # value of key propery. i.e -H 'environment: dev'
    patch: # action type
      - key: Host # header key
        val: example.com # header value
      - key: dispatched
        val: true
    destination: http://example.com # (optional) destination url
key: environment # key used to dispatch request
destination: http://example.org # default destination url
";

    #[test]
    fn the_seed_readme_config_parses_unchanged() {
        let rules = DispatchRules::from_seed_yaml("config.yaml", SEED_README_CONFIG).unwrap();
        assert_eq!(rules.key.as_ref().unwrap().as_str(), "environment");
        let dev = &rules.rewrites[b"dev".as_slice()];
        assert_eq!(dev.destination.to_string(), "http://example.com");
        let patch: Vec<_> = dev
            .patch
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(patch, [("host", "example.com"), ("dispatched", "true")]);
        assert_eq!(rules.default.destination.to_string(), "http://example.org");
    }

    #[test]
    fn a_rewrite_without_destination_uses_the_top_level_one() {
        let yaml = "key: env\ndestination: http://d:1\nrewrites:\n  qa:\n    patch:\n      - key: x\n        val: 1\n";
        let rules = DispatchRules::from_seed_yaml("c.yaml", yaml).unwrap();
        assert_eq!(
            rules.rewrites[b"qa".as_slice()].destination.to_string(),
            "http://d:1"
        );
    }

    #[test]
    fn missing_destination_is_the_seed_error() {
        let err = DispatchRules::from_seed_yaml("c.yaml", "key: env\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "c.yaml: destination: required: config doesn't have any destination"
        );
    }

    #[test]
    fn bad_values_are_all_reported() {
        let yaml = "key: env\ndestination: example.org\nrewrites:\n  a:\n    patch:\n      - key: 'bad key'\n        val: x\n    destination: 'ftp://x'\n";
        let err = DispatchRules::from_seed_yaml("c.yaml", yaml).unwrap_err();
        assert_eq!(err.errors.len(), 3, "{err}");
    }
}
