//! The `sidecar` binary: parse the command line, set up logging, load the policy, run.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sidecar::control::store::{Overrides, PolicySource};
use sidecar::server::{self, Listeners, RunOptions};

/// With glibc's allocator the proxy made ~31.5k requests/s in the benchmark seat; with mimalloc ~51k (its
/// per-thread free lists suit actix's thread-per-core workers). Its arenas are committed lazily (see
/// `.cargo/config.toml`), which keeps the peak RSS of the bench seat near 14 MiB instead of 25 MiB.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A single-container service-mesh sidecar.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Policy file or directory of *.yaml files (the embedded default when not given).
    #[arg(long, env = "SIDECAR_POLICY")]
    policy: Option<PathBuf>,
    /// Egress listener address: an IP (the port stays) or IP:PORT. Overrides the policy and SIDECAR_PORT.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Egress listener port, as the seed dispatcher reads it (`5000` or `:5000`).
    #[arg(
        long,
        env = "SIDECAR_PORT",
        value_name = "PORT",
        hide_env_values = true
    )]
    port: Option<String>,
    /// Admin listener address (IP:PORT). Overrides the policy.
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,
    /// Seed dispatcher config (dispatch rules); `./config.yaml` is used when it exists and this is not set.
    #[arg(long, env = "SIDECAR_CONFIG", value_name = "FILE")]
    dispatch_config: Option<PathBuf>,
    /// Worker threads for the egress listener. Overrides the policy.
    #[arg(long)]
    workers: Option<usize>,
    /// Do not reload when the policy files change (SIGHUP and POST /admin/reload still do).
    #[arg(long)]
    no_watch: bool,
    /// Turn the access log (JSON lines on stdout) on or off. Overrides the policy.
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    access_log: Option<bool>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sidecar (the default).
    Run,
    /// Validate a policy and print one line per service, or every error. Exit 0 when valid, 1 otherwise.
    Check {
        /// Policy file or directory (default: --policy, else the embedded default).
        path: Option<PathBuf>,
        /// Seed dispatcher config merged in as at start-up (default: the top-level --dispatch-config or
        /// SIDECAR_CONFIG, else ./config.yaml when it exists).
        #[arg(long, value_name = "FILE")]
        dispatch_config: Option<PathBuf>,
    },
    /// Development tooling, not a production CA: create a mesh CA (or issue from the one kept in --out, or from
    /// --ca) and a certificate per service (SPIFFE identity spiffe://<trust-domain>/service/<name>), and say
    /// where they were written.
    Certs {
        /// The services to issue certificates for.
        #[arg(required = true)]
        services: Vec<String>,
        /// Where to write <service>.pem and <service>-key.pem, and ca.pem and ca-key.pem when a CA is created.
        /// A CA already there (ca.pem and ca-key.pem) issues the certificates; it is never replaced without
        /// --force.
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// The SPIFFE trust domain the certificates name.
        #[arg(long, default_value = "mesh.local")]
        trust_domain: String,
        /// Days from now until the certificates expire (they are valid from a day ago, for clock skew).
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(i64).range(1..=36_500))]
        days: i64,
        /// Issue from this CA certificate (PEM) instead of the one in --out.
        #[arg(long, value_name = "FILE", conflicts_with = "force")]
        ca: Option<PathBuf>,
        /// The key of --ca (default: beside it, `<name>-key.pem` for `<name>.pem`).
        #[arg(long, value_name = "FILE", requires = "ca")]
        ca_key: Option<PathBuf>,
        /// Replace the CA in --out with a new one: every certificate it issued before stops chaining.
        #[arg(long)]
        force: bool,
    },
    /// Ask the admin listener whether the sidecar is alive (`/healthz`) or ready (`/readyz`): one line, exit 0
    /// when it answers 200, 1 otherwise. No TLS, no DNS: for container health checks.
    Health {
        /// Ask `/readyz` (ready to take traffic) instead of `/healthz` (alive).
        #[arg(long)]
        ready: bool,
        /// The admin listener's address.
        #[arg(
            long = "admin-addr",
            env = "SIDECAR_ADMIN",
            default_value = "127.0.0.1:9901"
        )]
        admin_addr: SocketAddr,
        /// How long to wait for the answer, in milliseconds.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Hold a network namespace for a compose "pod" until SIGTERM or SIGINT; nothing else.
    Pause,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The container helpers run before any logging is set up: they print one line or nothing.
    match &cli.command {
        Some(Command::Health {
            ready,
            admin_addr,
            timeout_ms,
        }) => {
            let path = if *ready { "/readyz" } else { "/healthz" };
            let found =
                sidecar::probe::probe(*admin_addr, path, Duration::from_millis(*timeout_ms));
            println!("{}", found.line);
            return if found.healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        Some(Command::Pause) => {
            return match sidecar::probe::pause() {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sidecar pause: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: `docker logs` and log shippers get plain lines.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let result = match &cli.command {
        Some(Command::Check {
            path,
            dispatch_config,
        }) => return check(&cli, path.as_deref(), dispatch_config.as_deref()),
        Some(Command::Certs {
            services,
            out,
            trust_domain,
            days,
            ca,
            ca_key,
            force,
        }) => {
            let source = match (ca, *force) {
                (Some(cert), _) => sidecar::certs::CaSource::Given {
                    key: ca_key.clone().unwrap_or_else(|| key_beside(cert)),
                    cert: cert.clone(),
                },
                (None, true) => sidecar::certs::CaSource::Replace,
                (None, false) => sidecar::certs::CaSource::Kept,
            };
            certs(services, out, trust_domain, *days, &source)
        }
        Some(Command::Run) | None => run(&cli),
        Some(Command::Health { .. } | Command::Pause) => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sidecar: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_on_off(text: &str) -> Result<bool, String> {
    match text {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        other => Err(format!("expected on or off, got {other:?}")),
    }
}

/// `SIDECAR_CONFIG` when set (a missing file is an error), else `./config.yaml` when it exists.
fn dispatch_config(cli: &Cli, given: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = given.or(cli.dispatch_config.as_deref()) {
        return Some(p.to_path_buf());
    }
    let fallback = PathBuf::from("config.yaml");
    fallback.is_file().then_some(fallback)
}

fn source(cli: &Cli, path: Option<&Path>, dispatch: Option<&Path>) -> anyhow::Result<PolicySource> {
    let mut overrides = Overrides {
        admin: cli.admin,
        workers: cli.workers,
        access_log: cli.access_log,
        ..Overrides::default()
    };
    if let Some(port) = &cli.port {
        let port = port.trim().trim_start_matches(':');
        overrides.egress_port =
            Some(port.parse().with_context(|| {
                format!("SIDECAR_PORT must be a port such as 5000, got {port:?}")
            })?);
    }
    if let Some(listen) = &cli.listen {
        if let Ok(full) = listen.parse::<SocketAddr>() {
            overrides.egress_ip = Some(full.ip());
            overrides.egress_port = Some(full.port());
        } else {
            let ip: IpAddr = listen
                .parse()
                .with_context(|| format!("--listen must be an IP or IP:PORT, got {listen:?}"))?;
            overrides.egress_ip = Some(ip);
        }
    }
    if cli.workers == Some(0) {
        anyhow::bail!("--workers must be at least 1");
    }
    Ok(PolicySource {
        policy: path.map(Path::to_path_buf).or_else(|| cli.policy.clone()),
        dispatch: dispatch_config(cli, dispatch),
        watch: !cli.no_watch,
        reload_debounce: None,
        overrides,
    })
}

/// `ca.pem` -> `ca-key.pem`: where `sidecar certs` writes a CA's key.
fn key_beside(cert: &Path) -> PathBuf {
    let stem = cert
        .file_stem()
        .map_or_else(Default::default, |s| s.to_string_lossy().into_owned());
    cert.with_file_name(format!("{stem}-key.pem"))
}

fn certs(
    services: &[String],
    out: &Path,
    trust_domain: &str,
    days: i64,
    source: &sidecar::certs::CaSource,
) -> anyhow::Result<()> {
    for s in services {
        if s.is_empty()
            || !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            anyhow::bail!("{s:?} is not a service name (letters, digits, '-', '_' and '.')");
        }
    }
    let written = sidecar::certs::write(out, trust_domain, services, days, source)?;
    println!(
        "development mesh CA (not for production, {}): {}",
        if written.new_ca { "new" } else { "kept" },
        written.ca.display()
    );
    println!(
        "  its key (keep it: a later `sidecar certs --out {}` issues from it): {}",
        out.display(),
        written.ca_key.display()
    );
    for (service, cert, key) in &written.services {
        println!(
            "{}: {} and {}",
            sidecar::certs::spiffe_id(trust_domain, service),
            cert.display(),
            key.display()
        );
    }
    Ok(())
}

fn check(cli: &Cli, path: Option<&Path>, dispatch: Option<&Path>) -> ExitCode {
    let loaded = source(cli, path, dispatch)
        .and_then(|s| s.load().map_err(|e| anyhow::anyhow!("{e}")))
        .and_then(|policy| {
            let errors = files_named(&policy);
            if errors.is_empty() {
                Ok(policy)
            } else {
                Err(anyhow::anyhow!("{}", errors.join("\n")))
            }
        });
    match loaded {
        Ok(policy) => {
            println!("{}: ok", policy.source);
            println!(
                "listeners: egress {}, admin {}, {} worker(s)",
                policy.listeners.egress, policy.listeners.admin, policy.listeners.workers
            );
            for (name, s) in &policy.services {
                let endpoints: Vec<String> = s.endpoints.iter().map(ToString::to_string).collect();
                println!(
                    "service {name}: {} endpoint(s) [{}], request timeout {}",
                    endpoints.len(),
                    endpoints.join(", "),
                    sidecar::policy::duration::format(s.request_timeout)
                );
            }
            if let Some(mesh) = &policy.mesh {
                println!(
                    "mesh: {}, certificate, key and CA ok",
                    sidecar::certs::spiffe_id(&mesh.trust_domain, &mesh.identity)
                );
            }
            if let Some(d) = &policy.dispatch {
                println!(
                    "dispatch: key {}, {} rewrite(s), default {}",
                    d.key.as_ref().map_or("-", |k| k.as_str()),
                    d.rewrites.len(),
                    d.default.destination
                );
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::FAILURE
        }
    }
}

/// The checks start-up makes on the files a valid policy names (the mesh certificate, key and CA; the egress
/// roots), so that `check` passes only what start-up accepts. One message per failure.
fn files_named(policy: &sidecar::policy::Policy) -> Vec<String> {
    sidecar::install_crypto_provider();
    let mut errors = Vec::new();
    if let Some(mesh) = &policy.mesh
        && let Err(e) = sidecar::mesh::Identity::load(mesh)
    {
        errors.push(format!("{e:#}"));
    }
    if let Err(e) = sidecar::dispatch::client::egress_tls(&policy.egress.roots) {
        errors.push(format!("{e:#}"));
    }
    errors
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let source = source(cli, None, None)?;
    let policy = source
        .load()
        .map_err(|e| anyhow::anyhow!("invalid policy:\n{e}"))?;
    let egress = policy.listeners.egress;
    let admin = policy.listeners.admin;
    actix_rt::System::new().block_on(async move {
        // Take over SIGHUP before anything listens: its default action would end a sidecar that a supervisor
        // signals while it starts.
        let _sighup = actix_rt::signal::unix::signal(actix_rt::signal::unix::SignalKind::hangup())?;
        let listeners = Listeners {
            egress: TcpListener::bind(egress).map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot listen on {egress}: {e}"))
            })?,
            admin: Some(TcpListener::bind(admin).map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot listen on {admin} (admin): {e}"))
            })?),
        };
        let summary = (
            policy.source.clone(),
            policy.services.len(),
            policy.dispatch.is_some(),
        );
        let running = server::start(
            source,
            policy,
            listeners,
            RunOptions {
                signals: true,
                ..RunOptions::default()
            },
        )?;
        tracing::info!(
            egress = %running.egress,
            admin = ?running.admin,
            policy = %summary.0,
            services = summary.1,
            dispatch = summary.2,
            "sidecar listening"
        );
        running.wait().await
    })?;
    // Spans of the last requests go out before the process ends.
    sidecar::traces::shutdown();
    Ok(())
}
