//! The resilience checks every request makes: a breaker's admission and outcome, the retry budget, the rate
//! limiter and the choice of an endpoint among 100 with each balancer. Run with `cargo bench -p sidecar --bench resilience`.

#![allow(
    clippy::expect_used,
    reason = "bench set-up: a panic is a broken bench"
)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use actix_http::header::HeaderMap;
use criterion::{Criterion, criterion_group, criterion_main};
use sidecar::policy::Policy;
use sidecar::policy::traffic::{BreakerPolicy, Resilience};
use sidecar::resilience::breaker::{Admit, Breaker};
use sidecar::resilience::monitor::Scope;
use sidecar::snapshot::Snapshot;

fn benches(c: &mut Criterion) {
    let defaults = Resilience::default();
    let breaker = Breaker::new(
        defaults.breaker.expect("a default breaker"),
        Scope::detached(),
    );
    c.bench_function("breaker/closed_admit_and_record", |b| {
        b.iter(|| match breaker.admit() {
            Admit::Pass(ticket) => ticket.record(black_box(false)),
            Admit::Refuse(_) => unreachable!("closed"),
        })
    });

    let open = Breaker::new(
        BreakerPolicy {
            consecutive_failures: 1,
            failure_rate: None,
            open_base: Duration::from_secs(3600),
            open_max: Duration::from_secs(3600),
            half_open_probes: 1,
            max_ejected: None,
        },
        Scope::detached(),
    );
    if let Admit::Pass(ticket) = open.admit() {
        ticket.record(true);
    }
    c.bench_function("breaker/open_refuse", |b| {
        b.iter(|| matches!(open.admit(), Admit::Refuse(_)))
    });

    let budget = sidecar::resilience::budget::RetryBudget::new(
        defaults.retries.budget.expect("a default budget"),
        sidecar::clock::Clock::system(),
    );
    c.bench_function("budget/deposit", |b| b.iter(|| budget.deposit()));

    let policy = Policy::from_yaml(
        "bench",
        "defaults:\n  rate_limit:\n    rate: 1000000000/s\n    key: source\n",
    )
    .expect("valid policy");
    let snapshot = Snapshot::from_policy(&policy);
    let external = snapshot.external.get("example.org:80");
    let limit = external.rate_limit.as_ref().expect("a rate limit");
    let headers = HeaderMap::new();
    let peer = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    c.bench_function("rate_limit/check_by_source", |b| {
        b.iter(|| limit.check(black_box(&headers), peer))
    });
    c.bench_function("authorities/lookup", |b| {
        b.iter(|| snapshot.external.get(black_box("example.org:80")))
    });

    // Picking one endpoint of 100 with each balancer (the bound: under 1 µs).
    let endpoints: Vec<String> = (0..100)
        .map(|i| format!("'10.0.{}.{}:8080'", i / 250, i % 250))
        .collect();
    let mut yaml = String::from("services:\n");
    for policy in [
        "p2c_ewma",
        "least_request",
        "round_robin",
        "consistent_hash",
    ] {
        yaml.push_str(&format!(
            "  {policy}:\n    endpoints: [{}]\n    load_balancer:\n      policy: {policy}\n",
            endpoints.join(", ")
        ));
    }
    let snapshot = Snapshot::from_policy(&Policy::from_yaml("bench", &yaml).expect("valid policy"));
    for (name, service) in &snapshot.services {
        let key = Some(sidecar::balance::stable_hash(b"user-42"));
        c.bench_function(&format!("pick_of_100/{name}"), |b| {
            b.iter(|| service.pick(None, black_box(key)))
        });
    }
}

criterion_group!(resilience_benches, benches);
criterion_main!(resilience_benches);
