//! The data plane: the request path as its phases, and what they use.
//!
//! The phases, in order, a module each (the list, what each may answer and the chart are in
//! `docs/request-path.md`, which a test holds equal to [`PHASES`]): [`guard`], [`route`], [`admit`], [`body`],
//! [`attempt`] (its steps: [`ATTEMPT_STEPS`]) and [`respond`], over one per-request context ([`exchange`]);
//! [`forward`] runs them for the egress listener, and the mesh inbound listener ([`crate::mesh`]) reuses
//! admit, body and respond. Also here: header hygiene ([`headers`]), path normalization for rules that match
//! paths ([`path`]), the per-worker upstream client ([`client`]), and which requests are copied with the tee
//! that feeds copies a streamed body ([`shadow`]), fan-out groups' legs and answers ([`fanout`]); upstream addresses are values of their own
//! ([`crate::upstream`]). Does not own: policy state (read from the [`crate::snapshot`]) or anything that needs
//! a timer or a mailbox. Called by the listeners built in [`crate::server`] and [`crate::mesh`].

pub mod admit;
pub mod attempt;
pub mod body;
pub mod client;
pub mod exchange;
pub mod fanout;
pub mod forward;
pub mod guard;
pub mod headers;
pub mod path;
pub mod respond;
pub mod route;
pub mod shadow;

/// The request path's phases, in order: each is a module of this folder.
pub const PHASES: [&str; 6] = ["guard", "route", "admit", "body", "attempt", "respond"];

/// The steps of each attempt, in order (see [`attempt`]).
pub const ATTEMPT_STEPS: [&str; 4] = ["choose", "send", "classify", "decide"];
