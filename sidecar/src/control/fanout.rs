//! The fan-out actor: it sends the fan-outs of `async` groups, which the app was answered 202 for, on an
//! arbiter (a thread) of its own, so that they outlive the connection that brought them, never share a
//! worker's event loop, and finish on drain: a graceful stop waits for them (within the drain timeout).
//!
//! The request path hands a fan-out over with [`Fanouts::offer`], a bounded `try_send` that never waits;
//! with the per-target queue slots of its group ([`crate::policy::fanout::Group::slots`]), that bounds what
//! waits here. Each leg runs through the same admit and attempt phases as on a worker
//! ([`crate::dispatch::fanout::run`]), with this thread's own upstream clients; answers are read to their end
//! and discarded.

use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::dispatch::client::Clients;
use crate::dispatch::fanout::{Leg, discard, run};
use crate::policy::fanout::{Group, Slot};
use crate::snapshot::SharedSnapshot;
use crate::telemetry::Instruments;

/// Fan-outs waiting for the actor, at most; past it the request is refused (503 `overloaded`).
pub const MAILBOX: usize = 1024;

/// One async fan-out handed to the actor, with the queue slot of each of its targets.
#[derive(Debug)]
pub struct FanoutJob {
    pub group: Arc<Group>,
    pub legs: Vec<Leg>,
    pub slots: Vec<Slot>,
}

impl Message for FanoutJob {
    type Result = ();
}

/// The request path's handle on its sidecar's fan-out actor (set once the actor runs), and the count of
/// fan-outs accepted and not yet ended, which a graceful stop waits for.
#[derive(Debug, Clone, Default)]
pub struct Fanouts {
    actor: Arc<OnceLock<Recipient<FanoutJob>>>,
    pending: Arc<AtomicUsize>,
}

impl Fanouts {
    /// Hands a fan-out over without waiting; a full mailbox (or no actor) gives it back.
    pub fn offer(&self, job: FanoutJob) -> Result<(), Box<FanoutJob>> {
        let Some(actor) = self.actor.get() else {
            return Err(Box::new(job));
        };
        self.pending.fetch_add(1, Ordering::AcqRel);
        match actor.try_send(job) {
            Ok(()) => Ok(()),
            Err(SendError::Full(job) | SendError::Closed(job)) => {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                Err(Box::new(job))
            }
        }
    }

    /// Fan-outs accepted and not yet ended.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Waits until every accepted fan-out has ended, or `within` has passed.
    pub async fn settle(&self, within: Duration) {
        let end = Instant::now() + within;
        while self.pending() > 0 && Instant::now() < end {
            actix_rt::time::sleep(Duration::from_millis(10)).await;
        }
        let left = self.pending();
        if left > 0 {
            tracing::warn!(
                left,
                "fan-outs still running at the end of the drain timeout are dropped"
            );
        }
    }
}

/// Sends the async fan-outs of one sidecar.
pub struct Fanner {
    fanouts: Fanouts,
    snapshot: SharedSnapshot,
    clients: Clients,
    instruments: Rc<Instruments>,
}

impl std::fmt::Debug for Fanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fanner").finish_non_exhaustive()
    }
}

impl Fanner {
    pub fn new(
        fanouts: Fanouts,
        snapshot: SharedSnapshot,
        tls: Arc<rustls::ClientConfig>,
        identity: Option<Arc<crate::mesh::Identity>>,
    ) -> Self {
        let clients = Clients::new(&snapshot.load(), tls, identity);
        Self {
            fanouts,
            snapshot,
            clients,
            instruments: Rc::default(),
        }
    }
}

impl Actor for Fanner {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX);
        let _ = self.fanouts.actor.set(ctx.address().recipient());
    }
}

/// Counts a fan-out as ended when dropped, however its task ends.
struct Ended(Arc<AtomicUsize>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Handler<FanoutJob> for Fanner {
    type Result = ();

    fn handle(&mut self, job: FanoutJob, _: &mut Self::Context) {
        self.clients.follow_pool(&self.snapshot.load());
        let ended = Ended(self.fanouts.pending.clone());
        let FanoutJob { legs, slots, .. } = job;
        let running: Vec<_> = legs
            .into_iter()
            .map(|leg| {
                let client = leg.plan.as_ref().ok().map(|p| self.clients.client_for(p));
                run(leg, client, self.instruments.clone())
            })
            .collect();
        actix_rt::spawn(async move {
            for landed in futures_util::future::join_all(running).await {
                discard(landed);
            }
            drop(slots);
            drop(ended);
        });
    }
}
