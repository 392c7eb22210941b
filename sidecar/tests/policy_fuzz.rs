//! The policy parser never panics: arbitrary input yields an error list or a valid policy, and so does input
//! assembled from the policy's own keys with hostile values.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

use proptest::prelude::*;
use sidecar::policy::Policy;
use sidecar::policy::locate::locate;
use sidecar::policy::seed::DispatchRules;

/// Keys and values from the policy's vocabulary, to reach past the YAML parser into validation.
fn fragment() -> impl Strategy<Value = String> {
    let keys = prop::sample::select(vec![
        "listeners",
        "egress",
        "admin",
        "workers",
        "max_header_size",
        "defaults",
        "timeouts",
        "connect",
        "request",
        "pool",
        "idle_timeout",
        "max_connections",
        "services",
        "orders",
        "endpoints",
        "dispatch",
        "key",
        "destination",
        "rewrites",
        "dev",
        "patch",
        "val",
        "egres",
    ]);
    let values = prop::sample::select(vec![
        "",
        "0",
        "-1",
        "250ms",
        "2s",
        "1m30s",
        "64KiB",
        "999999999999999999999GiB",
        "true",
        "null",
        "~",
        "127.0.0.1:5000",
        "[::1]:0",
        "http://h:1/p?q",
        "HTTP://H",
        "ftp://x",
        "h:99999",
        "[]",
        "{}",
        "[a, b]",
        "'bad key'",
        "\"\\u0000\"",
        "é",
        "*anchor",
        "&anchor x",
        "!!binary aGk=",
        "- x",
    ]);
    (keys, values, 0usize..4, any::<bool>()).prop_map(|(k, v, depth, item)| {
        let indent = "  ".repeat(depth);
        if item {
            format!("{indent}- {k}: {v}\n")
        } else {
            format!("{indent}{k}: {v}\n")
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        let _ = Policy::from_yaml("fuzz.yaml", &text);
        let _ = DispatchRules::from_seed_yaml("fuzz.yaml", &text);
    }

    #[test]
    fn documents_of_policy_keys_never_panic(parts in prop::collection::vec(fragment(), 0..24)) {
        let text: String = parts.concat();
        match Policy::from_yaml("fuzz.yaml", &text) {
            Ok(policy) => prop_assert!(policy.listeners.workers >= 1),
            Err(errors) => prop_assert!(!errors.errors.is_empty()),
        }
        let _ = DispatchRules::from_seed_yaml("fuzz.yaml", &text);
    }

    #[test]
    fn locating_any_path_in_any_text_never_panics(text in any::<String>(), path in "[a-z.\\[\\]0-9]{0,24}") {
        let _ = locate(&text, &path);
    }
}
