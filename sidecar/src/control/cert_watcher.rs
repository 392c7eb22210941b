//! The mesh certificate watcher: the actor that re-reads this sidecar's certificate files every second
//! ([`Identity::refresh`], which swaps in a new set only when it passes every check) and republishes the
//! seconds to expiry.

use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, AsyncContext, Context};

use crate::mesh::tls::Identity;

/// How often the certificate files are compared with the ones in use.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Re-reads the certificate files every second and republishes the seconds to expiry.
#[derive(Debug)]
pub struct CertWatcher(pub Arc<Identity>);

impl Actor for CertWatcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(WATCH_INTERVAL, |this, _| {
            this.0.refresh();
            this.0.publish_expiry();
        });
    }
}
