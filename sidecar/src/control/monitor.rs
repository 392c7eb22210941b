//! The resilience control plane: the actor that reports breaker transitions, owns the breakers' open timers
//! and, every second, publishes the breakers' states and evicts idle rate-limit keys.
//!
//! The request path flips a breaker's gate itself and tells this actor with a bounded `try_send`
//! ([`crate::resilience::monitor::Hub::transition`]); it never waits on it. One actor per sidecar: it is
//! connected to that sidecar's hub only.

use std::sync::Weak;
use std::time::Duration;

use actix::prelude::{Actor, AsyncContext, Context, Handler};
use metrics::SharedString;

use crate::resilience::breaker::{Breaker, State};
use crate::resilience::monitor::{Kind, Transition, report};
use crate::snapshot::SharedSnapshot;
use crate::telemetry::names::{BREAKER_STATE, ENDPOINT_BREAKER_STATE};

/// Transitions waiting in the actor's mailbox at most; past this the request path reports them itself.
pub const QUEUED_TRANSITIONS: usize = 1024;

/// The actor: one per sidecar, started with the listeners.
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
        ctx.set_mailbox_capacity(QUEUED_TRANSITIONS);
        self.snapshot.load().hub.connect(ctx.address().recipient());
        ctx.run_interval(Duration::from_secs(1), |this, _| this.tick());
    }
}

impl Monitor {
    /// The open timer of a breaker that just opened: half-open when its time is up. A manual clock moves
    /// only when a test says so, and the request path moves such a breaker itself when it finds it due.
    fn arm(&mut self, breaker: Weak<Breaker>, ctx: &mut Context<Self>) {
        let Some(b) = breaker.upgrade() else { return };
        if b.scope().hub.clock.is_manual() || b.state() != State::Open {
            return;
        }
        ctx.run_later(b.remaining_open(), move |this, ctx| {
            let Some(b) = breaker.upgrade() else { return };
            if b.half_open_if_due() {
                this.reported(Transition {
                    scope: b.scope().clone(),
                    to: State::HalfOpen,
                    breaker,
                });
            } else {
                // Early by a hair, or already moved on by a request (then this does nothing).
                this.arm(breaker, ctx);
            }
        });
    }

    fn reported(&mut self, event: Transition) {
        report(&event);
        if event.scope.kind == Kind::Service {
            metrics::gauge!(BREAKER_STATE, "service" => event.scope.service.clone())
                .set(event.to.gauge());
        }
    }
}

impl Handler<Transition> for Monitor {
    type Result = ();

    fn handle(&mut self, event: Transition, ctx: &mut Self::Context) {
        let opened = (event.to == State::Open).then(|| event.breaker.clone());
        self.reported(event);
        if let Some(breaker) = opened {
            self.arm(breaker, ctx);
        }
    }
}
