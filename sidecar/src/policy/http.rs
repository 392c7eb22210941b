//! HTTP hygiene settings: values the policy holds and the data plane applies ([`crate::dispatch::headers`],
//! [`crate::dispatch::path`], [`crate::mesh`]). Plain values: this file imports nothing of the crate.

use actix_http::header::HeaderName;

/// The verified identity of the peer sidecar, on every request the app receives through the mesh. The same
/// header arriving from outside is removed.
pub const PEER_IDENTITY: HeaderName = HeaderName::from_static("x-sidecar-peer-identity");

/// What the mesh hop does with a header whose name contains `_` (Envoy's `headers_with_underscores_action`,
/// `mesh.headers_with_underscores`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UnderscoreAction {
    /// Remove it and count it in `sidecar_headers_dropped_total`.
    #[default]
    Drop,
    /// Refuse the request: 400 `underscore-header`.
    Reject,
    /// Pass it on.
    Allow,
}

/// What to do with `%2F`, `%5C` and `\` in a path (Envoy's `path_with_escaped_slashes_action`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EncodedSlashes {
    /// 400 `bad-path`: an app or framework that decodes them would see other segments than authorization did.
    #[default]
    Reject,
    /// Keep them as they are, inside their segment (neither decoded nor a separator).
    Allow,
}

/// How paths are normalized (`mesh.inbound.paths`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathOptions {
    /// Merge runs of `/` into one before dot segments are removed (off by default, as in Envoy).
    pub merge_slashes: bool,
    pub encoded_slashes: EncodedSlashes,
}
