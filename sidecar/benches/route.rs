//! The pure, per-request pieces of the request path: parsing a `target`, joining paths, choosing a route (also
//! behind an egress allow-list), header hygiene and path normalization. Run with `cargo bench -p sidecar --bench route`.

#![allow(
    clippy::expect_used,
    reason = "bench set-up: a panic is a broken bench"
)]

use std::hint::black_box;

use actix_http::Uri;
use actix_http::header::{HeaderMap, HeaderName, HeaderValue};
use criterion::{Criterion, criterion_group, criterion_main};
use sidecar::dispatch::headers::{UnderscoreAction, strip_request, underscores};
use sidecar::dispatch::path::{PathOptions, normalize};
use sidecar::dispatch::route::{Targets, route};
use sidecar::policy::Policy;
use sidecar::snapshot::Snapshot;
use sidecar::upstream::Upstream;

const POLICY: &str = "services:\n  orders:\n    endpoints: ['10.0.0.1:8080', '10.0.0.2:8080']\ndispatch:\n  key: environment\n  destination: http://default:80\n  rewrites:\n    dev:\n      patch:\n        - key: Host\n          val: example.com\n      destination: http://dev:80\n";

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in pairs {
        map.append(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    map
}

fn benches(c: &mut Criterion) {
    let snapshot =
        Snapshot::from_policy(&Policy::from_yaml("bench", POLICY).expect("valid policy"));
    let request: Uri = "/items?id=7".parse().expect("uri");

    c.bench_function("target/parse", |b| {
        b.iter(|| Upstream::parse(black_box("http://orders.internal:8080/api")))
    });
    let plain = Upstream::parse("http://orders:8080").expect("upstream");
    c.bench_function("target/join_no_prefix", |b| {
        b.iter(|| plain.uri_for(black_box(&request)))
    });
    let prefixed = Upstream::parse("http://orders:8080/api").expect("upstream");
    c.bench_function("target/join_prefix", |b| {
        b.iter(|| prefixed.uri_for(black_box(&request)))
    });

    // A worker's cache of parsed targets, warm as it is after an app's first call to a target.
    let targets = Targets::default();
    let by_url = headers(&[("target", "http://orders:8080/api"), ("accept", "*/*")]);
    c.bench_function("route/target_url", |b| {
        b.iter(|| route(&snapshot, black_box(&by_url), &targets).map(|r| r.request_timeout))
    });
    c.bench_function("route/target_url_first_call", |b| {
        b.iter_batched_ref(
            Targets::default,
            |cold| route(&snapshot, black_box(&by_url), cold).map(|r| r.request_timeout),
            criterion::BatchSize::SmallInput,
        )
    });
    let by_service = headers(&[("target", "orders"), ("internal", "true")]);
    c.bench_function("route/internal_service", |b| {
        b.iter(|| route(&snapshot, black_box(&by_service), &targets).map(|r| r.request_timeout))
    });
    let by_rule = headers(&[("environment", "dev"), ("accept", "*/*")]);
    c.bench_function("route/dispatch_rule", |b| {
        b.iter(|| route(&snapshot, black_box(&by_rule), &targets).map(|r| r.request_timeout))
    });

    let guarded = Snapshot::from_policy(
        &Policy::from_yaml(
            "bench",
            "egress:\n  allow:\n    hosts: [api.example.com, '*.internal.example', orders]\n    cidrs: [10.0.0.0/8]\n",
        )
        .expect("valid policy"),
    );
    c.bench_function("route/target_url_allow_list", |b| {
        b.iter(|| route(&guarded, black_box(&by_url), &targets).map(|r| r.request_timeout))
    });

    let typical = headers(&[
        ("host", "localhost:5000"),
        ("target", "http://orders:8080"),
        ("user-agent", "curl/8.0"),
        ("accept", "*/*"),
        ("content-type", "application/json"),
        ("x-request-id", "abc"),
    ]);
    c.bench_function("headers/strip_request", |b| {
        b.iter_batched_ref(
            || typical.clone(),
            |h| strip_request(black_box(h)),
            criterion::BatchSize::SmallInput,
        )
    });
    c.bench_function("headers/underscores_drop_none", |b| {
        b.iter_batched_ref(
            || typical.clone(),
            |h| underscores(black_box(h), UnderscoreAction::Drop, "inbound"),
            criterion::BatchSize::SmallInput,
        )
    });

    // The inbound listener's normalization: the fast path for a path that is already normal, and the copy
    // for one with dot segments and escapes.
    let options = PathOptions::default();
    c.bench_function("path/normal", |b| {
        b.iter(|| normalize(black_box("/api/v1.2/orders/7/items"), options).map(|p| p.len()))
    });
    c.bench_function("path/dot_segments", |b| {
        b.iter(|| {
            normalize(black_box("/api/v1.2/orders/%2e%2e/./items/../7"), options).map(|p| p.len())
        })
    });
    let merging = PathOptions {
        merge_slashes: true,
        ..PathOptions::default()
    };
    c.bench_function("path/normal_merge_slashes", |b| {
        b.iter(|| normalize(black_box("/api/v1.2/orders/7/items"), merging).map(|p| p.len()))
    });
}

criterion_group!(route_benches, benches);
criterion_main!(route_benches);
