//! The shared per-target state every request touches, from two threads at once (the sidecar's workers on a
//! 2-core machine): what contention costs. Run with `cargo bench -p sidecar --bench contention`.
//! Each figure is the time per operation per thread while both threads run.

#![allow(
    clippy::expect_used,
    reason = "bench set-up: a panic is a broken bench"
)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use actix_http::header::HeaderMap;
use criterion::{Criterion, criterion_group, criterion_main};
use sidecar::clock::Clock;
use sidecar::policy::Policy;
use sidecar::policy::traffic::Resilience;
use sidecar::resilience::breaker::{Admit, Breaker};
use sidecar::resilience::budget::RetryBudget;
use sidecar::resilience::monitor::Scope;
use sidecar::resilience::{Authorities, Target};
use sidecar::snapshot::Snapshot;

/// Runs `op` `iters` times on each of two threads at once; the time of the slower thread.
fn two_threads<T: Send + Sync + 'static>(state: &Arc<T>, iters: u64, op: fn(&T)) -> Duration {
    let barrier = Arc::new(Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (state, barrier) = (state.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let started = Instant::now();
                for _ in 0..iters {
                    op(&state);
                }
                started.elapsed()
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("bench thread"))
        .max()
        .unwrap_or_default()
}

fn benches(c: &mut Criterion) {
    let defaults = Resilience::default();
    let budget = Arc::new(RetryBudget::new(
        defaults.retries.budget.expect("a default budget"),
        Clock::system(),
    ));
    c.bench_function("budget/deposit_2_threads", |b| {
        b.iter_custom(|iters| two_threads(&budget, iters, |b| black_box(b).deposit()))
    });
    c.bench_function("budget/deposit_1_thread", |b| {
        b.iter(|| black_box(&budget).deposit())
    });

    let breaker = Breaker::new(
        defaults.breaker.expect("a default breaker"),
        Scope::detached(),
    );
    c.bench_function("breaker/closed_admit_and_record_2_threads", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    let breaker = breaker.clone();
                    std::thread::spawn(move || {
                        for _ in 0..iters {
                            match breaker.admit() {
                                Admit::Pass(ticket) => ticket.record(black_box(false)),
                                Admit::Refuse(_) => {}
                            }
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().expect("bench thread");
            }
            start.elapsed()
        })
    });

    // A URL target's state, looked up by both workers; then a keyed rate limit (by source) on it.
    let policy = Policy::from_yaml(
        "bench",
        "defaults:\n  rate_limit:\n    rate: 1000000000/s\n    key: source\n",
    )
    .expect("valid policy");
    let snapshot = Snapshot::from_policy(&policy);
    let external: Arc<Authorities> = snapshot.external.clone();
    external.get("example.org:80");
    c.bench_function("authorities/lookup_2_threads", |b| {
        b.iter_custom(|iters| {
            two_threads(&external, iters, |a| {
                black_box(a.get(black_box("example.org:80")));
            })
        })
    });
    let target: Arc<Target> = external.get("example.org:80");
    c.bench_function("rate_limit/check_by_source_2_threads", |b| {
        b.iter_custom(|iters| {
            two_threads(&target, iters, |t| {
                let limit = t.rate_limit.as_ref().expect("a rate limit");
                let peer = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
                let _ = black_box(limit.check(&HeaderMap::new(), peer));
            })
        })
    });
}

criterion_group! {
    name = contention;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(contention);
