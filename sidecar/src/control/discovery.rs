//! Service discovery: the actor that keeps each service's endpoint set current from DNS (A/AAAA or SRV
//! records, through hickory-resolver) or a hosts file, and publishes it into the snapshot.
//!
//! Owns: the resolver, each source's schedule (re-resolved when its answer's TTL expires, within the
//! service's `min_ttl`..`max_ttl`) and its last good answer, which survives any failure. Does not own: how
//! endpoints are chosen ([`crate::balance`]) or the policy (a reload that rebuilds a service keeps the
//! endpoints published here while its discovery source is unchanged, see [`crate::snapshot::Snapshot::build`];
//! each tick publishes the last good answer again in case a rebuild did not).
//!
//! The request path only reads the snapshot; this actor replaces one service at a time in it, on the same
//! arbiter as the policy store, so the two never interleave.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::{Actor, ActorFutureExt, AsyncContext, Context, WrapFuture};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;

use crate::policy::{Discovery as Spec, DiscoverySource};
use crate::snapshot::SharedSnapshot;
use crate::upstream::Upstream;

pub use crate::telemetry::names::{DISCOVERY_UPDATES as UPDATES, SERVICE_ENDPOINTS as ENDPOINTS};

/// How often sources are checked for being due (and hosts files for changes).
const TICK: Duration = Duration::from_millis(200);
/// The longest one resolution may take.
const LOOKUP_LIMIT: Duration = Duration::from_secs(5);

/// The actor.
pub struct Discovery {
    snapshot: SharedSnapshot,
    /// Built when a DNS source first needs it, and again when `dns.nameservers` changes.
    resolver: Option<(Vec<SocketAddr>, TokioResolver)>,
    sources: HashMap<String, Source>,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("sources", &self.sources.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Source {
    spec: Spec,
    due: Instant,
    resolving: bool,
    last_good: Option<Vec<Upstream>>,
    /// A hosts file's contents when last read well.
    stamp: Option<String>,
}

impl Discovery {
    pub fn new(snapshot: SharedSnapshot) -> Self {
        Self {
            snapshot,
            resolver: None,
            sources: HashMap::new(),
        }
    }

    /// The resolver for the policy's name servers (the system's when it names none).
    fn resolver(&mut self) -> Result<TokioResolver, String> {
        let wanted = self.snapshot.load().nameservers.clone();
        match &self.resolver {
            Some((servers, resolver)) if *servers == wanted => Ok(resolver.clone()),
            _ => {
                let resolver = build_resolver(&wanted)?;
                self.resolver = Some((wanted, resolver.clone()));
                Ok(resolver)
            }
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let snapshot = self.snapshot.load();
        let now = Instant::now();
        // Follow the policy: new services, changed specs, removed services.
        self.sources.retain(|name, source| {
            snapshot
                .services
                .get(name.as_str())
                .and_then(|s| s.policy.discovery.as_ref())
                .is_some_and(|spec| *spec == source.spec)
        });
        for (name, service) in &snapshot.services {
            if let Some(spec) = &service.policy.discovery {
                self.sources
                    .entry(name.to_string())
                    .or_insert_with(|| Source {
                        spec: spec.clone(),
                        due: now,
                        resolving: false,
                        last_good: None,
                        stamp: None,
                    });
            }
        }
        drop(snapshot);

        let names: Vec<String> = self.sources.keys().cloned().collect();
        for name in names {
            let Some(source) = self.sources.get_mut(&name) else {
                continue;
            };
            // A reload may have rebuilt the service with its static endpoints: put the last answer back.
            if let Some(good) = source.last_good.clone() {
                self.publish(&name, &good, false);
            }
            let Some(source) = self.sources.get_mut(&name) else {
                continue;
            };
            if source.resolving || now < source.due {
                continue;
            }
            match source.spec.source.clone() {
                DiscoverySource::HostsFile { path } => {
                    source.due = now + TICK;
                    self.read_hosts_file(&name, &path);
                }
                DiscoverySource::Dns { name: host, port } => {
                    self.resolve(ctx, name, Query::Ip { host, port });
                }
                DiscoverySource::Srv { name: host } => {
                    self.resolve(ctx, name, Query::Srv { host });
                }
            }
        }
    }

    fn resolve(&mut self, ctx: &mut Context<Self>, service: String, query: Query) {
        let resolver = match self.resolver() {
            Ok(r) => r,
            Err(e) => {
                if let Some(s) = self.sources.get_mut(&service) {
                    s.due = Instant::now() + s.spec.max_ttl;
                }
                self.failed(&service, &format!("no DNS resolver: {e}"));
                return;
            }
        };
        if let Some(s) = self.sources.get_mut(&service) {
            s.resolving = true;
        }

        // The resolver has its own timeouts, but a lookup whose first packet met a closed port was seen to never
        // finish: bound it, or the source would never be resolved again.
        let lookup = async move {
            tokio::time::timeout(LOOKUP_LIMIT, query.run(&resolver))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {LOOKUP_LIMIT:?}")))
        };
        ctx.spawn(lookup.into_actor(self).map(move |result, this, _| {
            let Some(source) = this.sources.get_mut(&service) else {
                return;
            };
            source.resolving = false;
            let (min, max) = (source.spec.min_ttl, source.spec.max_ttl);
            match result {
                Ok((endpoints, valid_until)) if !endpoints.is_empty() => {
                    let ttl = valid_until.saturating_duration_since(Instant::now());
                    source.due = Instant::now() + ttl.clamp(min, max);
                    source.last_good = Some(endpoints.clone());
                    this.publish(&service, &endpoints, true);
                }
                Ok(_) => {
                    source.due = Instant::now() + min;
                    this.failed(&service, "the name has no records");
                }
                Err(e) => {
                    source.due = Instant::now() + min;
                    // A resolver whose name server was unreachable when first asked was seen to stay broken
                    // after the server came up: start the next attempt with a fresh one.
                    this.resolver = None;
                    this.failed(&service, &e);
                }
            }
        }));
    }

    fn read_hosts_file(&mut self, service: &str, path: &PathBuf) {
        let Some(source) = self.sources.get_mut(service) else {
            return;
        };
        // Compared by content, not by modification time and size: a replacement of the same length written
        // within the file system's timestamp tick would otherwise go unseen. Hosts files are small.
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                source.stamp = None;
                self.failed(service, &format!("cannot read {}: {e}", path.display()));
                return;
            }
        };
        if source.stamp.as_deref() == Some(text.as_str()) {
            return;
        }
        match parse_hosts_file(&text) {
            Ok(endpoints) => {
                source.stamp = Some(text);
                source.last_good = Some(endpoints.clone());
                self.publish(service, &endpoints, true);
            }
            Err(e) => {
                // A half-written file is read again on the next tick; the last good set serves meanwhile.
                source.stamp = None;
                self.failed(service, &format!("{}: {e}", path.display()));
            }
        }
    }

    fn failed(&self, service: &str, why: &str) {
        tracing::warn!(
            service,
            error = why,
            "service discovery failed; the last endpoints stay"
        );
        metrics::counter!(UPDATES, "service" => service.to_string(), "result" => "failed")
            .increment(1);
    }

    /// Replaces the service's endpoints in the snapshot when they differ.
    fn publish(&self, name: &str, endpoints: &[Upstream], answer: bool) {
        let snapshot = self.snapshot.load();
        let Some(service) = snapshot.services.get(name) else {
            return;
        };
        // A mesh service's endpoints are peer sidecars' mTLS listeners, whichever source named them (static
        // endpoints are made https when the policy is read).
        let meshed: Vec<Upstream>;
        let endpoints = if service.policy.mesh {
            meshed = endpoints
                .iter()
                .cloned()
                .map(Upstream::into_https)
                .collect();
            &meshed[..]
        } else {
            endpoints
        };
        let same = service.endpoints.len() == endpoints.len()
            && service
                .endpoints
                .iter()
                .zip(endpoints)
                .all(|(a, b)| a.upstream == *b);
        if answer {
            let result = if same { "unchanged" } else { "changed" };
            metrics::counter!(UPDATES, "service" => name.to_string(), "result" => result)
                .increment(1);
        }
        if same {
            return;
        }
        tracing::info!(
            service = name,
            endpoints = %endpoints.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            "service endpoints changed"
        );
        metrics::gauge!(ENDPOINTS, "service" => name.to_string()).set(endpoints.len() as f64);
        let next = Arc::new(service.with_endpoints(endpoints));
        let replaced = snapshot.with_service(name, next);
        drop(snapshot);
        self.snapshot.store(Arc::new(replaced));
    }
}

impl Actor for Discovery {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.tick(ctx);
        ctx.run_interval(TICK, Self::tick);
    }
}

fn build_resolver(nameservers: &[SocketAddr]) -> Result<TokioResolver, String> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = if nameservers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| e.to_string())?
    } else {
        let servers = nameservers
            .iter()
            .map(|addr| {
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
            })
            .collect();
        TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
    };
    let options = builder.options_mut();
    // Our own schedule decides when to ask again: never serve an answer past its TTL from a cache.
    options.cache_size = 0;
    // A resolution that hangs only delays the next one (the last good set serves meanwhile): fail quickly.
    options.timeout = Duration::from_secs(2);
    builder.build().map_err(|e| e.to_string())
}

enum Query {
    Ip { host: String, port: u16 },
    Srv { host: String },
}

impl Query {
    /// The endpoints and how long the answer is valid.
    async fn run(self, resolver: &TokioResolver) -> Result<(Vec<Upstream>, Instant), String> {
        match self {
            Query::Ip { host, port } => {
                let lookup = resolver
                    .lookup_ip(fqdn(&host))
                    .await
                    .map_err(|e| format!("{host}: {e}"))?;
                let mut endpoints: Vec<Upstream> =
                    lookup.iter().filter_map(|ip| endpoint(ip, port)).collect();
                endpoints.sort_by_key(ToString::to_string);
                endpoints.dedup();
                Ok((endpoints, lookup.valid_until()))
            }
            Query::Srv { host } => {
                let lookup = resolver
                    .srv_lookup(fqdn(&host))
                    .await
                    .map_err(|e| format!("{host}: {e}"))?;
                let mut valid_until = lookup.valid_until();
                let mut endpoints = Vec::new();
                for record in lookup.answers() {
                    let RData::SRV(srv) = &record.data else {
                        continue;
                    };
                    let target = srv.target.to_ascii();
                    let ips = resolver
                        .lookup_ip(target.as_str())
                        .await
                        .map_err(|e| format!("{target}: {e}"))?;
                    valid_until = valid_until.min(ips.valid_until());
                    endpoints.extend(ips.iter().filter_map(|ip| endpoint(ip, srv.port)));
                }
                endpoints.sort_by_key(ToString::to_string);
                endpoints.dedup();
                Ok((endpoints, valid_until))
            }
        }
    }
}

fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

fn endpoint(ip: IpAddr, port: u16) -> Option<Upstream> {
    Upstream::parse_endpoint(&SocketAddr::new(ip, port).to_string()).ok()
}

/// The ringpop seed's hosts file: a JSON array of `"host:port"`.
pub fn parse_hosts_file(text: &str) -> Result<Vec<Upstream>, String> {
    let hosts: Vec<String> = serde_json::from_str(text)
        .map_err(|e| format!("not a JSON array of \"host:port\": {e}"))?;
    hosts
        .iter()
        .map(|h| Upstream::parse_endpoint(h).map_err(|why| format!("{h:?}: {why}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hosts_file_is_a_json_array_of_host_port() {
        let endpoints = parse_hosts_file(r#"["10.0.0.1:3000", "orders:3001"]"#).unwrap();
        assert_eq!(endpoints.len(), 2);
        assert_eq!(endpoints[1].authority().as_str(), "orders:3001");
        assert!(parse_hosts_file(r#"["10.0.0.1"]"#).is_err());
        assert!(parse_hosts_file("10.0.0.1:3000").is_err());
    }
}
