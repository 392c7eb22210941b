//! The data plane: route matching and forwarding.
//!
//! Owns: the request path ([`forward`]), route selection ([`route`]), header hygiene ([`headers`]), path
//! normalization for rules that match paths ([`path`]) and the per-worker upstream client ([`client`]); upstream
//! addresses are values of their own ([`crate::upstream`]). Does not own: policy state (read from
//! the [`crate::snapshot`]) or anything that needs a timer or a mailbox.
//! Called by the egress listener built in [`crate::server`].

pub mod client;
pub mod forward;
pub mod headers;
pub mod path;
pub mod route;
