//! The control plane: the actors that own state and timers and publish into the snapshot the request path
//! reads. None of them is on the request path; it never waits on their mailboxes.
//!
//! - [`store`]: the policy store: loads, validates and applies policies live, and drives the listeners.
//! - [`discovery`]: keeps services' endpoints current from DNS (A/AAAA, SRV) or a hosts file.
//! - [`health`]: active HTTP health checks of service endpoints.
//! - [`monitor`]: reports breaker transitions, publishes breaker states, evicts idle rate-limit keys.
//! - [`cert_watcher`]: re-reads the mesh certificate files and swaps in a valid new set.
//! - [`shadow`]: sends traffic copies, on a thread of its own.
//! - [`fanout`]: sends the fan-outs of `async` groups, on a thread of its own; a graceful stop waits for them.

pub mod cert_watcher;
pub mod discovery;
pub mod fanout;
pub mod health;
pub mod monitor;
pub mod shadow;
pub mod store;
