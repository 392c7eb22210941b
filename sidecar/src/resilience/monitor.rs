//! What a breaker reports: its scope, and the transitions the request path sends to the monitor actor
//! ([`crate::control::monitor`]).
//!
//! The request path changes a breaker's state itself (a breaker that opened a tick late would let a burst of
//! requests into a failing upstream) and tells the actor with a fire-and-forget message; it never waits on it.

use std::sync::{Arc, RwLock};

use actix::prelude::{Message, Recipient};
use metrics::SharedString;

use super::breaker::State;

pub use crate::telemetry::names::{
    BREAKER_STATE, BREAKER_TRANSITIONS, CIRCUIT_OPEN, ENDPOINT_BREAKER_STATE, OVERLOADED,
    RATE_LIMITED, RETRIES, RETRIES_SKIPPED,
};

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

/// Where transitions go from now on: the monitor actor ([`crate::control::monitor`]) while it runs, else the log.
pub fn set_sink(sink: Option<Recipient<Transition>>) {
    *SINK.write().unwrap_or_else(|p| p.into_inner()) = sink;
}

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

/// Logs and counts a transition.
pub fn report(event: &Transition) {
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
