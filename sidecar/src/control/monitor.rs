//! The resilience control plane: the actor that reports breaker transitions and, on a timer, publishes the
//! breakers' states and evicts idle rate-limit keys.
//!
//! The request path changes a breaker's state itself and tells this actor with a fire-and-forget message
//! ([`crate::resilience::monitor::transition`]); it never waits on it.

use std::time::Duration;

use actix::prelude::{Actor, AsyncContext, Context, Handler};
use metrics::SharedString;

use crate::resilience::monitor::{Kind, Transition, report, set_sink};
use crate::snapshot::SharedSnapshot;
use crate::telemetry::names::{BREAKER_STATE, ENDPOINT_BREAKER_STATE};

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
        set_sink(Some(ctx.address().recipient()));
        ctx.run_interval(Duration::from_secs(1), |this, _| this.tick());
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        set_sink(None);
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
