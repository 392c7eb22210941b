//! Active health checks: the actor that asks each endpoint of a service with `health_check` for a path on an
//! interval, and takes it out of rotation after `unhealthy_threshold` failures in a row, back after
//! `healthy_threshold` successes.
//!
//! Owns: the checks' schedule and counters. The verdict is one atomic flag per endpoint
//! ([`crate::snapshot::Endpoint::healthy`]) that the balancer reads; endpoints keep it across discovery
//! updates because they are shared between versions of the service.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use actix::prelude::{Actor, ActorFutureExt, AsyncContext, Context, WrapFuture};

use crate::policy::UpstreamSettings;
use crate::snapshot::{Endpoint, SharedSnapshot};

/// Health check results by service and result (`healthy`, `unhealthy`: transitions only).
pub const TRANSITIONS: &str = "sidecar_health_check_transitions_total";

const TICK: Duration = Duration::from_millis(100);

pub fn describe() {
    metrics::describe_counter!(
        TRANSITIONS,
        "Endpoints marked healthy or unhealthy by active health checks."
    );
}

/// The actor.
pub struct HealthChecker {
    snapshot: SharedSnapshot,
    settings: UpstreamSettings,
    /// Built when a service first asks for health checks: most sidecars never need it.
    client: Option<awc::Client>,
    /// By endpoint (the `Arc`'s address identifies it across discovery updates).
    checks: HashMap<usize, Check>,
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
            self.checks.entry(key).or_insert_with(|| Check {
                endpoint,
                service,
                due: now,
                running: false,
                successes: 0,
                failures: 0,
            });
        }
        let due: Vec<usize> = self
            .checks
            .iter()
            .filter(|(_, c)| !c.running && c.due <= now)
            .map(|(k, _)| *k)
            .collect();
        for key in due {
            self.check(ctx, key);
        }
    }

    fn check(&mut self, ctx: &mut Context<Self>, key: usize) {
        let snapshot = self.snapshot.load();
        let Some(check) = self.checks.get_mut(&key) else {
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
        ctx.spawn(probe.into_actor(self).map(move |result, this, _| {
            let Some(check) = this.checks.get_mut(&key) else {
                return;
            };
            check.running = false;
            check.due = Instant::now() + spec.interval;
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
