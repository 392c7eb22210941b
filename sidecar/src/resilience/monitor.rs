//! The resilience control plane: the actor that reports breaker transitions and, on a timer, publishes the
//! breakers' states and evicts idle rate-limit keys.
//!
//! The request path changes a breaker's state itself (a breaker that opened a tick late would let a burst of
//! requests into a failing upstream) and tells this actor with a fire-and-forget message; it never waits on it.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::prelude::{Actor, AsyncContext, Context, Handler, Message, Recipient};
use metrics::SharedString;

use super::breaker::State;
use crate::snapshot::SharedSnapshot;

/// Breaker state by service (0 closed, 1 open, 2 half-open).
pub const BREAKER_STATE: &str = "sidecar_circuit_breaker_state";
/// Endpoint breaker state by service and endpoint.
pub const ENDPOINT_BREAKER_STATE: &str = "sidecar_endpoint_breaker_state";
/// Breaker transitions by service, scope (`service` or `endpoint`) and the state entered.
pub const BREAKER_TRANSITIONS: &str = "sidecar_circuit_breaker_transitions_total";
/// Retries by service and reason.
pub const RETRIES: &str = "sidecar_retries_total";
/// Retries the policy called for but did not make, by service and reason (`budget_exhausted`, ...).
pub const RETRIES_SKIPPED: &str = "sidecar_retries_skipped_total";
/// Requests refused by a rate limit, by service.
pub const RATE_LIMITED: &str = "sidecar_rate_limited_total";
/// Requests refused by a concurrency limit, by service and reason.
pub const OVERLOADED: &str = "sidecar_overloaded_total";
/// Requests refused because a breaker was open, by service.
pub const CIRCUIT_OPEN: &str = "sidecar_circuit_open_total";

/// Help texts, as Prometheus shows them.
pub fn describe() {
    metrics::describe_gauge!(
        BREAKER_STATE,
        "Circuit breaker state per service: 0 closed, 1 open, 2 half-open."
    );
    metrics::describe_gauge!(
        ENDPOINT_BREAKER_STATE,
        "Circuit breaker state per service endpoint: 0 closed, 1 open, 2 half-open."
    );
    metrics::describe_counter!(
        BREAKER_TRANSITIONS,
        "Circuit breaker transitions by the state entered."
    );
    metrics::describe_counter!(
        RETRIES,
        "Retries made, by the reason of the failed attempt."
    );
    metrics::describe_counter!(
        RETRIES_SKIPPED,
        "Retries the conditions called for but not made (budget_exhausted, body_not_replayable, method, deadline, retry_after_too_long, attempts)."
    );
    metrics::describe_counter!(RATE_LIMITED, "Requests refused with 429 by a rate limit.");
    metrics::describe_counter!(
        OVERLOADED,
        "Requests refused with 503 by a concurrency limit (queue_full, queue_timeout, deadline)."
    );
    metrics::describe_counter!(
        CIRCUIT_OPEN,
        "Requests refused with 503 because the circuit breaker was open."
    );
}

/// Which breaker a transition belongs to.
#[derive(Debug, Clone)]
pub struct Scope {
    /// The metrics label: the service name, `external` or `dispatch`.
    pub service: SharedString,
    /// The endpoint or authority, for logs; for endpoint breakers also a metrics label.
    pub endpoint: Option<Arc<str>>,
    pub kind: Kind,
}

/// What a breaker guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A service of the registry.
    Service,
    /// One endpoint of a service.
    Endpoint,
    /// A URL target's or a dispatch destination's authority (many of them share one label).
    Authority,
}

impl Scope {
    /// A scope that reports nowhere in particular (unit tests).
    pub fn detached() -> Self {
        Self {
            service: SharedString::const_str("none"),
            endpoint: None,
            kind: Kind::Authority,
        }
    }
}

/// A breaker changed state.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Transition {
    pub scope: Scope,
    pub to: State,
}

static SINK: RwLock<Option<Recipient<Transition>>> = RwLock::new(None);

/// Reports a transition to the monitor (fire and forget), or logs it when no monitor runs.
pub fn transition(scope: &Scope, to: State) {
    let event = Transition {
        scope: scope.clone(),
        to,
    };
    let sink = SINK.read().unwrap_or_else(|p| p.into_inner()).clone();
    match sink {
        Some(sink) => sink.do_send(event),
        None => report(&event),
    }
}

fn report(event: &Transition) {
    let scope = &event.scope;
    let endpoint = scope.endpoint.as_deref().unwrap_or("");
    match event.to {
        State::Open => tracing::warn!(service = %scope.service, endpoint, "circuit breaker opened"),
        State::HalfOpen => {
            tracing::info!(service = %scope.service, endpoint, "circuit breaker half-open: probing")
        }
        State::Closed => {
            tracing::info!(service = %scope.service, endpoint, "circuit breaker closed")
        }
    }
    let kind = match scope.kind {
        Kind::Service => "service",
        Kind::Endpoint => "endpoint",
        Kind::Authority => "authority",
    };
    metrics::counter!(
        BREAKER_TRANSITIONS,
        "service" => scope.service.clone(),
        "scope" => kind,
        "state" => event.to.as_str(),
    )
    .increment(1);
}

/// The actor: one per process, started with the listeners.
#[derive(Debug)]
pub struct Monitor {
    snapshot: SharedSnapshot,
}

impl Monitor {
    pub fn new(snapshot: SharedSnapshot) -> Self {
        Self { snapshot }
    }

    /// Publishes breaker states and evicts idle rate-limit keys.
    fn tick(&mut self) {
        let snapshot = self.snapshot.load();
        for service in snapshot.services.values() {
            let label = SharedString::from(service.name.clone());
            if let Some(b) = &service.target.breaker {
                metrics::gauge!(BREAKER_STATE, "service" => label.clone()).set(b.state().gauge());
            }
            for (i, e) in service.endpoints.iter().enumerate() {
                if let Some(b) = service.outlier(i) {
                    metrics::gauge!(
                        ENDPOINT_BREAKER_STATE,
                        "service" => label.clone(),
                        "endpoint" => e.label.clone(),
                    )
                    .set(b.state().gauge());
                }
            }
            if let Some(limit) = &service.target.rate_limit {
                limit.evict_idle();
            }
        }
        snapshot.external.evict_idle();
        snapshot.dispatch_targets.evict_idle();
    }
}

impl Actor for Monitor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        *SINK.write().unwrap_or_else(|p| p.into_inner()) = Some(ctx.address().recipient());
        ctx.run_interval(Duration::from_secs(1), |this, _| this.tick());
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        *SINK.write().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl Handler<Transition> for Monitor {
    type Result = ();

    fn handle(&mut self, event: Transition, _: &mut Self::Context) {
        report(&event);
        if event.scope.kind == Kind::Service {
            metrics::gauge!(BREAKER_STATE, "service" => event.scope.service.clone())
                .set(event.to.gauge());
        }
    }
}
