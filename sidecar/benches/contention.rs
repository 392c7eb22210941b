//! The shared per-target state every request touches, from two threads at once (the sidecar's workers on a
//! 2-core machine): what contention costs. Run with `cargo bench -p sidecar --bench contention`.
//! Each figure is the time per operation per thread while both threads run.

#![allow(
    clippy::expect_used,
    reason = "bench set-up: a panic is a broken bench"
)]

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use sidecar::policy::traffic::Resilience;
use sidecar::resilience::breaker::{Admit, Breaker};
use sidecar::resilience::budget::RetryBudget;
use sidecar::resilience::monitor::Scope;

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
}

criterion_group! {
    name = contention;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(contention);
