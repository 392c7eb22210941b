//! Active health checks: the actor that asks each endpoint of a service with `health_check` for a path on an
//! interval, and takes it out of rotation after `unhealthy_threshold` failures in a row, back after
//! `healthy_threshold` successes.
//!
//! Owns: the checks' schedule and counters. The verdict is one atomic flag per endpoint
//! ([`crate::snapshot::Endpoint::healthy`]) that the balancer reads; endpoints keep it across discovery
//! updates because they are shared between versions of the service.
//!
//! Each endpoint's checks start every `interval` from its first ([`next_due`]): a timer per endpoint, armed
//! when a check ends for the next one's start, so neither the check's own time nor a polling tick stretches
//! the interval. A tick only follows the snapshot's endpoint set, starting the first check of a new endpoint.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use actix::prelude::{Actor, ActorFutureExt, AsyncContext, Context, WrapFuture};

use crate::policy::UpstreamSettings;
use crate::snapshot::{Endpoint, SharedSnapshot};

pub use crate::telemetry::names::HEALTH_TRANSITIONS as TRANSITIONS;

/// How often the endpoint set is compared with the snapshot's (new endpoints get their first check then).
const TICK: Duration = Duration::from_millis(100);

/// The actor.
pub struct HealthChecker {
    snapshot: SharedSnapshot,
    settings: UpstreamSettings,
    /// Built when a service first asks for health checks: most sidecars never need it.
    client: Option<awc::Client>,
    /// By endpoint (the `Arc`'s address identifies it across discovery updates).
    checks: HashMap<usize, Check>,
    /// Numbers each check's schedule, so that a timer armed for an endpoint that left never runs the checks
    /// of another endpoint that got the same address.
    generation: u64,
}

impl std::fmt::Debug for HealthChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthChecker")
            .field("endpoints", &self.checks.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Check {
    endpoint: Arc<Endpoint>,
    service: Arc<str>,
    generation: u64,
    /// When the next check starts.
    due: Instant,
    running: bool,
    successes: u32,
    failures: u32,
}

impl HealthChecker {
    pub fn new(snapshot: SharedSnapshot, settings: &UpstreamSettings) -> Self {
        Self {
            snapshot,
            settings: settings.clone(),
            client: None,
            checks: HashMap::new(),
            generation: 0,
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let snapshot = self.snapshot.load();
        let now = Instant::now();
        let mut live = HashMap::new();
        for service in snapshot.services.values() {
            if service.policy.health_check.is_none() {
                continue;
            }
            for endpoint in &service.endpoints {
                live.insert(
                    Arc::as_ptr(endpoint) as usize,
                    (service.name.clone(), endpoint.clone()),
                );
            }
        }
        drop(snapshot);
        // Endpoints that left (or whose service stopped checking) are forgotten, and count as healthy again.
        self.checks.retain(|key, check| {
            let keep = live.contains_key(key);
            if !keep {
                check.endpoint.healthy.store(true, Ordering::Release);
            }
            keep
        });
        for (key, (service, endpoint)) in live {
            if self.checks.contains_key(&key) {
                continue;
            }
            self.generation += 1;
            let generation = self.generation;
            self.checks.insert(
                key,
                Check {
                    endpoint,
                    service,
                    generation,
                    due: now,
                    running: false,
                    successes: 0,
                    failures: 0,
                },
            );
            self.check(ctx, key, generation);
        }
    }

    /// Runs the check of endpoint `key` that is due now, if its schedule is still `generation`'s.
    fn check(&mut self, ctx: &mut Context<Self>, key: usize, generation: u64) {
        let snapshot = self.snapshot.load();
        let Some(check) = self
            .checks
            .get_mut(&key)
            .filter(|c| c.generation == generation && !c.running)
        else {
            return;
        };
        let Some(spec) = snapshot
            .services
            .get(&*check.service)
            .and_then(|s| s.policy.health_check.clone())
        else {
            return;
        };
        check.running = true;
        check.due = next_due(check.due, spec.interval, Instant::now());
        let uri = check
            .endpoint
            .upstream
            .uri_for(&spec.path)
            .map_err(|why| why.to_string());
        let settings = &self.settings;
        let client = self.client.get_or_insert_with(|| {
            crate::dispatch::client::build(settings, crate::dispatch::client::tls_config())
        });
        let request = uri.map(|uri| {
            client
                .get(uri)
                .insert_header((
                    actix_http::header::HOST,
                    check.endpoint.upstream.host_header().clone(),
                ))
                .timeout(spec.timeout)
                .send()
        });
        let probe = async move {
            match request {
                Ok(sending) => match sending.await {
                    Ok(response) if response.status().is_success() => Ok(()),
                    Ok(response) => Err(format!("answered {}", response.status())),
                    Err(e) => Err(e.to_string()),
                },
                Err(why) => Err(why),
            }
        };
        ctx.spawn(probe.into_actor(self).map(move |result, this, ctx| {
            let Some(check) = this
                .checks
                .get_mut(&key)
                .filter(|c| c.generation == generation)
            else {
                return;
            };
            check.running = false;
            // A check that overran its interval is followed by the next at once.
            let wait = check.due.saturating_duration_since(Instant::now());
            ctx.run_later(wait, move |this, ctx| this.check(ctx, key, generation));
            let healthy = check.endpoint.healthy.load(Ordering::Acquire);
            match result {
                Ok(()) => {
                    check.successes += 1;
                    check.failures = 0;
                    if !healthy && check.successes >= spec.healthy_threshold {
                        check.endpoint.healthy.store(true, Ordering::Release);
                        tracing::info!(service = %check.service, endpoint = %check.endpoint.label, "health check passed: endpoint back in rotation");
                        metrics::counter!(TRANSITIONS, "service" => check.service.to_string(), "result" => "healthy").increment(1);
                    }
                }
                Err(why) => {
                    check.failures += 1;
                    check.successes = 0;
                    if healthy && check.failures >= spec.unhealthy_threshold {
                        check.endpoint.healthy.store(false, Ordering::Release);
                        tracing::warn!(service = %check.service, endpoint = %check.endpoint.label, error = %why, "health check failed: endpoint out of rotation");
                        metrics::counter!(TRANSITIONS, "service" => check.service.to_string(), "result" => "unhealthy").increment(1);
                    }
                }
            }
        }));
    }
}

impl Actor for HealthChecker {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(TICK, Self::tick);
    }
}

/// When the check after one due at `due` and started at `now` starts: one `interval` after `due`, so that
/// checks keep their rate whatever each one takes; an actor that fell more than an interval behind starts
/// afresh from `now` rather than catching up with a burst.
fn next_due(due: Instant, interval: Duration, now: Instant) -> Instant {
    let next = due + interval;
    if next > now { next } else { now + interval }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_start_every_interval_whatever_each_takes() {
        let interval = Duration::from_millis(200);
        let t0 = Instant::now();
        let mut due = t0;
        let mut starts = Vec::new();
        for _ in 0..5 {
            // Each check starts 3 ms late (a timer's lateness) and takes 40 ms: neither shifts the next.
            let started = due + Duration::from_millis(3);
            starts.push(started - t0);
            due = next_due(due, interval, started);
        }
        let ms: Vec<u128> = starts.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [3, 203, 403, 603, 803]);
    }

    #[test]
    fn a_check_started_far_too_late_does_not_bring_a_burst() {
        let interval = Duration::from_millis(200);
        let t0 = Instant::now();
        let late = t0 + Duration::from_millis(700);
        assert_eq!(next_due(t0, interval, late), late + interval);
    }
}
