//! What a breaker reports: its scope, and the transitions the request path sends to its sidecar's monitor
//! actor ([`crate::control::monitor`]) through that sidecar's [`Hub`].
//!
//! The request path flips a breaker's gate itself (a breaker that opened a tick late would let a burst of
//! requests into a failing upstream) and tells the actor with a bounded `try_send`; it never waits on it. A
//! full or closed mailbox loses nothing: the gate has already flipped, and the transition is logged and
//! counted on the spot instead.

use std::sync::{Arc, OnceLock, Weak};

use actix::prelude::{Message, Recipient, SendError};
use metrics::SharedString;

use super::breaker::{Breaker, State};
use crate::clock::Clock;
use crate::telemetry::Metrics;

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
    /// The sidecar this breaker belongs to: its clock and its monitor.
    pub hub: Hub,
}

/// What every target of one sidecar shares: the clock it reads, the monitor it reports to and the metrics it
/// counts into. Each sidecar has its own, so two sidecars in one process never report or count each other's
/// events.
#[derive(Debug, Clone, Default)]
pub struct Hub {
    pub clock: Clock,
    pub metrics: Metrics,
    sink: Arc<OnceLock<Recipient<Transition>>>,
}

impl Hub {
    pub fn new(clock: Clock, metrics: Metrics) -> Self {
        Self {
            clock,
            metrics,
            sink: Arc::default(),
        }
    }

    /// The monitor started: transitions go to it from now on. False when one was connected already.
    pub fn connect(&self, monitor: Recipient<Transition>) -> bool {
        self.sink.set(monitor).is_ok()
    }

    /// Reports a transition to the monitor without waiting; logged and counted here when its mailbox is full,
    /// or when no monitor runs.
    pub fn transition(&self, event: Transition) {
        let event = match self.sink.get() {
            Some(sink) => match sink.try_send(event) {
                Ok(()) => return,
                Err(SendError::Full(event) | SendError::Closed(event)) => event,
            },
            None => event,
        };
        report(&event);
    }
}

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
            hub: Hub::default(),
        }
    }

    /// The same scope reading `clock` (unit tests and benches).
    pub fn with_clock(self, clock: Clock) -> Self {
        Self {
            hub: Hub::new(clock, Metrics::default()),
            ..self
        }
    }
}

/// A breaker changed state.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Transition {
    pub scope: Scope,
    pub to: State,
    /// The breaker, so that the monitor can move an open one to half-open when its time is up.
    pub breaker: Weak<Breaker>,
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
