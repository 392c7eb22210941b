//! The policy store: the control-plane actor that owns the active policy, reloads it, and publishes snapshots.
//!
//! Owns: where the policy comes from ([`PolicySource`]), the active [`Policy`], the reload history
//! ([`PolicyStatus`]) and the file watcher. Publishes each valid change as one new [`Snapshot`] in a single
//! atomic swap; requests in flight keep the snapshot they loaded. An invalid change leaves the old snapshot
//! serving and is logged and counted. Does not own: the request path, which only reads the snapshot.
//! Called through [`PolicyHandle`] by the admin listener, the SIGHUP task and the file watcher.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use notify::Watcher;
use serde::Serialize;

use crate::policy::{Policy, PolicyErrors};
use crate::snapshot::{SharedSnapshot, Snapshot};

/// Events closer together than this are one change (editors write a file in several steps): a changed file is
/// read once it has been quiet this long. [`PolicySource::reload_debounce`] changes it.
pub const DEBOUNCE: Duration = Duration::from_millis(150);
/// A change is read at the latest this long after its first event, however busy the directory.
const MAX_DELAY: Duration = Duration::from_secs(1);

/// Where the policy is read from, and the command line's overrides applied to every version of it.
#[derive(Debug, Clone, Default)]
pub struct PolicySource {
    /// A policy file or directory; the embedded default when `None`.
    pub policy: Option<PathBuf>,
    /// A seed dispatcher `config.yaml` merged in as dispatch rules.
    pub dispatch: Option<PathBuf>,
    /// Reload when the files change (the binary does unless `--no-watch`); without it, only SIGHUP and
    /// `POST /admin/reload` reload.
    pub watch: bool,
    /// How long the watched files must be quiet before a change is read ([`DEBOUNCE`] when `None`).
    pub reload_debounce: Option<Duration>,
    pub overrides: Overrides,
}

/// Listener settings given on the command line or in the environment; they win over the files.
#[derive(Debug, Clone, Copy, Default)]
pub struct Overrides {
    pub egress_ip: Option<IpAddr>,
    pub egress_port: Option<u16>,
    pub admin: Option<SocketAddr>,
    pub workers: Option<usize>,
    /// Turns the access log on or off whatever the files say.
    pub access_log: Option<bool>,
}

impl PolicySource {
    /// Reads and validates the policy, then applies the overrides.
    pub fn load(&self) -> Result<Policy, PolicyErrors> {
        let policy = match &self.policy {
            Some(path) => Policy::load(path)?,
            None => Policy::embedded_default()?,
        };
        let mut policy = match &self.dispatch {
            Some(file) => policy.with_seed_dispatch(file)?,
            None => policy,
        };
        let o = &self.overrides;
        let listeners = &mut policy.listeners;
        if let Some(ip) = o.egress_ip {
            listeners.egress.set_ip(ip);
        }
        if let Some(port) = o.egress_port {
            listeners.egress.set_port(port);
        }
        if let Some(admin) = o.admin {
            listeners.admin = admin;
        }
        if let Some(workers) = o.workers {
            listeners.workers = workers;
        }
        if let Some(on) = o.access_log {
            policy.access_log.enabled = on;
        }
        Ok(policy)
    }

    /// Whether a changed path can change the policy: the policy file itself, a `*.yaml`/`*.yml` file of the
    /// policy directory, or the seed file.
    fn concerns(&self, changed: &Path) -> bool {
        // Only the watched directories report events, so the file name is enough (and paths may be relative
        // here and absolute in events).
        let same = |a: &Path, b: &Path| a.file_name() == b.file_name();
        if self.dispatch.as_deref().is_some_and(|d| same(d, changed)) {
            return true;
        }
        match &self.policy {
            Some(p) if p.is_dir() => {
                matches!(
                    changed.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml")
                )
            }
            Some(p) => same(p, changed),
            None => false,
        }
    }

    /// The directories to watch: a policy directory itself, or the directory holding a file (files are often
    /// replaced by rename, which a watch on the file itself would miss).
    fn watch_dirs(&self) -> Vec<PathBuf> {
        let dir_of = |p: &Path| {
            if p.is_dir() {
                p.to_path_buf()
            } else {
                p.parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
            }
        };
        let mut dirs: Vec<PathBuf> = self
            .policy
            .iter()
            .chain(&self.dispatch)
            .map(|p| dir_of(p))
            .collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }
}

/// The listeners, as the store drives them when a policy changes their addresses, workers or pools.
pub trait ListenerControl {
    /// Reads and checks what `next` needs before anything changes (the mesh certificate files it names);
    /// every error rejects the reload, as an invalid file does, and the running policy keeps serving.
    fn prepare(&mut self, _running: &Policy, _next: &Policy) -> Result<(), Vec<String>> {
        Ok(())
    }

    /// Applies the listener and pool settings of `next`; one result per change, `Err` when a change could not
    /// be made (the listener then stays as it was).
    fn apply(&mut self, running: &Policy, next: &Policy) -> Vec<Result<String, String>>;
}

/// What a reload did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReloadResult {
    /// A new snapshot is serving.
    Applied,
    /// The sources did not change.
    Unchanged,
    /// The new policy is invalid; the old one keeps serving.
    Rejected,
}

/// One reload attempt.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    pub trigger: &'static str,
    pub at_unix_ms: u64,
    pub result: ReloadResult,
    /// The version serving after the attempt.
    pub version: u64,
    pub errors: Vec<String>,
    /// Listeners replaced by this reload (their old servers drain).
    pub listener_changes: Vec<String>,
    /// Changes that were validated but could not be applied to the running listeners.
    pub restart_required: Vec<String>,
}

/// What `GET /admin/policy` shows.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyStatus {
    pub version: u64,
    pub source: String,
    pub files: Vec<String>,
    pub hash: String,
    pub loaded_at_unix_ms: u64,
    pub services: Vec<String>,
    pub dispatch_rules: bool,
    pub reloads_applied: u64,
    pub reloads_unchanged: u64,
    pub reloads_rejected: u64,
    pub last_reload: Option<ReloadReport>,
    /// The most recent reload, when it was rejected: the files on disk are invalid and an older version serves.
    /// Cleared by the next reload that finds them valid.
    pub last_error: Option<ReloadReport>,
    /// Settings changed in the files that the running process cannot apply without a restart.
    pub restart_required: Vec<String>,
}

/// The actor. Its state changes only through its mailbox.
pub struct PolicyStore {
    source: PolicySource,
    snapshot: SharedSnapshot,
    active: Policy,
    status: PolicyStatus,
    /// The pending debounced reload and when its burst of events began.
    scheduled: Option<(SpawnHandle, Instant)>,
    watcher: Option<notify::RecommendedWatcher>,
    listeners: Option<Box<dyn ListenerControl>>,
}

impl std::fmt::Debug for PolicyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyStore")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl PolicyStore {
    /// A store serving `policy` (already loaded from `source`) through `snapshot`.
    pub fn new(source: PolicySource, policy: Policy, snapshot: SharedSnapshot) -> Self {
        let status = PolicyStatus {
            version: snapshot.load().version,
            source: policy.source.clone(),
            files: policy
                .files
                .iter()
                .map(|f| f.display().to_string())
                .collect(),
            hash: format!("{:016x}", policy.hash),
            loaded_at_unix_ms: now_ms(),
            services: policy.services.keys().cloned().collect(),
            dispatch_rules: policy.dispatch.is_some(),
            reloads_applied: 0,
            reloads_unchanged: 0,
            reloads_rejected: 0,
            last_reload: None,
            last_error: None,
            restart_required: Vec::new(),
        };
        Self {
            source,
            snapshot,
            active: policy,
            status,
            scheduled: None,
            watcher: None,
            listeners: None,
        }
    }

    /// Lets the store move listeners when a policy changes them.
    pub fn with_listeners(mut self, listeners: Box<dyn ListenerControl>) -> Self {
        self.listeners = Some(listeners);
        self
    }

    /// Reads the sources again and publishes them if they are valid and changed.
    fn reload(&mut self, trigger: &'static str) -> ReloadReport {
        let loaded = self.source.load().and_then(|policy| {
            if policy.hash == self.active.hash {
                return Ok(policy);
            }
            match self.listeners.as_mut() {
                Some(control) => control
                    .prepare(&self.active, &policy)
                    .map(|()| policy)
                    .map_err(|errors| PolicyErrors { errors }),
                None => Ok(policy),
            }
        });
        let report = match loaded {
            Err(errors) => {
                for e in &errors.errors {
                    tracing::warn!(trigger, error = %e, "policy rejected; the previous policy keeps serving");
                }
                self.status.reloads_rejected += 1;
                ReloadReport {
                    trigger,
                    at_unix_ms: now_ms(),
                    result: ReloadResult::Rejected,
                    version: self.status.version,
                    errors: errors.errors,
                    listener_changes: Vec::new(),
                    restart_required: Vec::new(),
                }
            }
            Ok(policy) if policy.hash == self.active.hash => {
                self.status.reloads_unchanged += 1;
                ReloadReport {
                    trigger,
                    at_unix_ms: now_ms(),
                    result: ReloadResult::Unchanged,
                    version: self.status.version,
                    errors: Vec::new(),
                    listener_changes: Vec::new(),
                    restart_required: Vec::new(),
                }
            }
            Ok(policy) => self.apply(policy, trigger),
        };
        // `last_error` describes the files as they are: a later reload that reads them valid (applied, or
        // unchanged because the bad edit was undone) clears it; the counters keep the history.
        self.status.last_error = (report.result == ReloadResult::Rejected).then(|| report.clone());
        let result = match report.result {
            ReloadResult::Applied => "applied",
            ReloadResult::Unchanged => "unchanged",
            ReloadResult::Rejected => "rejected",
        };
        metrics::counter!(crate::telemetry::POLICY_RELOADS, "result" => result).increment(1);
        self.status.last_reload = Some(report.clone());
        report
    }

    fn apply(&mut self, mut policy: Policy, trigger: &'static str) -> ReloadReport {
        let (mut listener_changes, mut restart_required) = (Vec::new(), Vec::new());
        match self.listeners.as_mut() {
            Some(control) => {
                for result in control.apply(&self.active, &policy) {
                    match result {
                        Ok(change) => {
                            tracing::info!(change = %change, "listener changed");
                            listener_changes.push(change);
                        }
                        Err(failure) => {
                            tracing::warn!(failure = %failure, "listener change not applied; restart to apply it");
                            restart_required.push(failure);
                        }
                    }
                }
            }
            None => {
                restart_required = needs_restart(&self.active, &policy);
                for what in &restart_required {
                    tracing::warn!(change = %what, "policy change needs a restart to take effect");
                }
            }
        }
        if !restart_required.is_empty() {
            // What runs is what started: a later reload compares against it and tries again.
            policy.listeners.egress = self.active.listeners.egress;
            policy.listeners.admin = self.active.listeners.admin;
            policy.listeners.workers = self.active.listeners.workers;
            // Only the pool settings live in the running server; timeouts and resilience apply through the
            // snapshot.
            let (running, next) = (&self.active.upstream, &mut policy.upstream);
            next.timeouts.connect = running.timeouts.connect;
            next.idle_timeout = running.idle_timeout;
            next.max_connections = running.max_connections;
        }
        let version = self.status.version + 1;
        let next = Snapshot::build(&policy, version, Some(&self.snapshot.load()));
        self.snapshot.store(Arc::new(next));
        tracing::info!(
            trigger,
            version,
            hash = %format!("{:016x}", policy.hash),
            services = policy.services.len(),
            "policy applied"
        );
        #[allow(
            clippy::cast_precision_loss,
            reason = "a version counter stays far below 2^52"
        )]
        metrics::gauge!(crate::telemetry::POLICY_VERSION).set(version as f64);
        let s = &mut self.status;
        s.version = version;
        s.source = policy.source.clone();
        s.files = policy
            .files
            .iter()
            .map(|f| f.display().to_string())
            .collect();
        s.hash = format!("{:016x}", policy.hash);
        s.loaded_at_unix_ms = now_ms();
        s.services = policy.services.keys().cloned().collect();
        s.dispatch_rules = policy.dispatch.is_some();
        s.reloads_applied += 1;
        s.restart_required = restart_required.clone();
        self.active = policy;
        ReloadReport {
            trigger,
            at_unix_ms: now_ms(),
            result: ReloadResult::Applied,
            version,
            errors: Vec::new(),
            listener_changes,
            restart_required,
        }
    }

    fn watch(&mut self, ctx: &mut Context<Self>) {
        let dirs = self.source.watch_dirs();
        if !self.source.watch || dirs.is_empty() {
            return;
        }
        let addr = ctx.address();
        let source = self.source.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let relevant = event
                .is_ok_and(|e| !e.kind.is_access() && e.paths.iter().any(|p| source.concerns(p)));
            if relevant {
                // A full mailbox already holds a change to handle; dropping this one loses nothing.
                let _dropped_when_full = addr.try_send(FilesChanged);
            }
        });
        let mut watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch policy files; reload with SIGHUP or POST /admin/reload");
                return;
            }
        };
        for dir in &dirs {
            match watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
                Ok(()) => tracing::info!(dir = %dir.display(), "watching policy files"),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch policy directory")
                }
            }
        }
        self.watcher = Some(watcher);
    }
}

/// The settings a running process applies only at start-up.
fn needs_restart(running: &Policy, next: &Policy) -> Vec<String> {
    let (a, b) = (&running.listeners, &next.listeners);
    let mut out = Vec::new();
    if a.egress != b.egress {
        out.push(format!(
            "listeners.egress: {} -> {} (restart to rebind)",
            a.egress, b.egress
        ));
    }
    if a.admin != b.admin {
        out.push(format!(
            "listeners.admin: {} -> {} (restart to rebind)",
            a.admin, b.admin
        ));
    }
    if a.workers != b.workers {
        out.push(format!(
            "listeners.workers: {} -> {} (restart to apply)",
            a.workers, b.workers
        ));
    }
    // The request timeout applies at once (it is in the snapshot); these live in the upstream pools.
    let (a, b) = (&running.upstream, &next.upstream);
    if a.timeouts.connect != b.timeouts.connect {
        out.push("defaults.timeouts.connect: changed (restart to apply to upstream pools)".into());
    }
    if a.idle_timeout != b.idle_timeout || a.max_connections != b.max_connections {
        out.push("defaults.pool: changed (restart to apply to upstream pools)".into());
    }
    if running.egress.roots != next.egress.roots {
        out.push("egress.tls: changed (restart to apply to upstream pools)".into());
    }
    // The certificates' contents are watched by the mesh itself; its listener and file names are not.
    let (a, b) = (running.mesh.as_ref(), next.mesh.as_ref());
    let inbound = |m: Option<&crate::policy::Mesh>| m.map(|m| m.inbound.clone());
    let files = |m: Option<&crate::policy::Mesh>| {
        m.map(|m| (m.ca.clone(), m.cert.clone(), m.key.clone(), m.tls12))
    };
    if a.is_some() != b.is_some() || inbound(a) != inbound(b) || files(a) != files(b) {
        out.push(
            "mesh: the inbound listener, files or TLS versions changed (restart to apply)".into(),
        );
    }
    out
}

impl Actor for PolicyStore {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(16);
        #[allow(
            clippy::cast_precision_loss,
            reason = "a version counter stays far below 2^52"
        )]
        metrics::gauge!(crate::telemetry::POLICY_VERSION).set(self.status.version as f64);
        self.watch(ctx);
    }
}

/// Reload now.
#[derive(Debug, Message)]
#[rtype(result = "ReloadReport")]
pub struct Reload(pub &'static str);

impl Handler<Reload> for PolicyStore {
    type Result = MessageResult<Reload>;

    fn handle(&mut self, msg: Reload, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.reload(msg.0))
    }
}

/// The watcher saw a change in a policy directory.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct FilesChanged;

impl Handler<FilesChanged> for PolicyStore {
    type Result = ();

    /// Reloads once the files have been quiet for the debounce ([`DEBOUNCE`] by default), so a write in several steps (or an edit across
    /// several files) is read whole; a burst longer than `MAX_DELAY` is read anyway.
    fn handle(&mut self, _: FilesChanged, ctx: &mut Self::Context) {
        let began = match self.scheduled.take() {
            Some((pending, began)) if began.elapsed() < MAX_DELAY => {
                ctx.cancel_future(pending);
                began
            }
            Some(kept) => {
                self.scheduled = Some(kept);
                return;
            }
            None => Instant::now(),
        };
        let quiet = self.source.reload_debounce.unwrap_or(DEBOUNCE);
        let pending = ctx.run_later(quiet, |store, _| {
            store.scheduled = None;
            store.reload("file change");
        });
        self.scheduled = Some((pending, began));
    }
}

/// The current status.
#[derive(Debug, Message)]
#[rtype(result = "PolicyStatus")]
pub struct Status;

impl Handler<Status> for PolicyStore {
    type Result = MessageResult<Status>;

    fn handle(&mut self, _: Status, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.status.clone())
    }
}

/// A typed handle on the store.
#[derive(Debug, Clone)]
pub struct PolicyHandle(Addr<PolicyStore>);

impl From<Addr<PolicyStore>> for PolicyHandle {
    fn from(addr: Addr<PolicyStore>) -> Self {
        Self(addr)
    }
}

impl PolicyHandle {
    /// Reloads now and reports what happened.
    pub async fn reload(&self, trigger: &'static str) -> Result<ReloadReport, MailboxError> {
        self.0.send(Reload(trigger)).await
    }

    pub async fn status(&self) -> Result<PolicyStatus, MailboxError> {
        self.0.send(Status).await
    }
}
