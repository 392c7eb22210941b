//! Metrics are real Prometheus metrics: `promtool check metrics` finds nothing to say about the exposition, and
//! a real Prometheus server scraping the admin listener answers queries with the requests that were made.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

mod support;

use std::io::Write;
use std::process::{Child, Command, Stdio};

use support::{DEADLINE, RawUpstream, Sidecar, get, request, response};

/// A Prometheus server on loopback, stopped on drop.
struct Prometheus {
    child: Child,
    addr: std::net::SocketAddr,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn scraping(target: std::net::SocketAddr, name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("sidecar-prometheus-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: sidecar\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = support::process::free_port();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the prometheus server (Debian's `prometheus` package; scripts/test.sh installs it)");
        Self {
            child,
            addr,
            _dir: TempDir(dir),
        }
    }

    /// Polls an instant query until it returns `want` for a single series, within the deadline.
    async fn until(&self, query: &str, want: f64) {
        let encoded: String = query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        // The server starts, then scrapes every second: slower than the sidecar, so twice the usual bound.
        let what = format!("prometheus answers {want} for {query}");
        support::eventually_within(&what, DEADLINE * 2, || async {
            if std::net::TcpStream::connect(self.addr).is_err() {
                return false;
            }
            let reply = request(
                self.addr,
                &format!("GET /api/v1/query?query={encoded} HTTP/1.1\r\nhost: p\r\nconnection: close\r\n\r\n"),
            )
            .await;
            if reply.status != 200 {
                eprintln!("prometheus: {}", reply.text());
                return false;
            }
            let value = reply.json()["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok());
            value == Some(want)
        })
        .await;
    }
}

#[actix_rt::test]
async fn a_real_prometheus_scrapes_the_sidecar_and_sees_its_requests() {
    let upstream = RawUpstream::ok().await;
    let sidecar = Sidecar::start(&format!(
        "services:\n  orders:\n    endpoints: ['{}']\n",
        upstream.addr
    ));
    for _ in 0..3 {
        assert_eq!(
            get(
                sidecar.addr,
                "/o",
                &[("target", "orders"), ("internal", "true")]
            )
            .await
            .status,
            200
        );
    }
    for _ in 0..2 {
        assert_eq!(
            get(
                sidecar.addr,
                "/",
                &[("target", "payments"), ("internal", "true")]
            )
            .await
            .status,
            503
        );
    }

    // The exposition passes promtool's checks.
    let exposition = request(sidecar.admin, "GET /metrics HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(exposition.status, 200);
    assert!(
        exposition
            .header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    promtool_accepts(&exposition.body);

    let prometheus = Prometheus::scraping(sidecar.admin, "egress");
    prometheus
        .until(r#"sum(http_server_request_duration_seconds_count{service="orders",direction="egress",outcome="ok",status_class="2xx"})"#, 3.0)
        .await;
    prometheus
        .until(
            r#"sum(http_client_request_duration_seconds_count{service="orders",outcome="ok"})"#,
            3.0,
        )
        .await;
    prometheus
        .until(r#"sum(http_server_request_duration_seconds_count{service="none",outcome="unknown-service",status_class="5xx"})"#, 2.0)
        .await;
    prometheus.until(r#"sidecar_build_info"#, 1.0).await;
    prometheus.until(r#"sidecar_policy_version"#, 1.0).await;
    prometheus
        .until(r#"http_server_active_requests"#, 0.0)
        .await;
    sidecar.stop().await;
}

/// Runs `promtool check metrics` on an exposition and fails with what it says.
fn promtool_accepts(exposition: &[u8]) {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's `prometheus` package; scripts/test.sh installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(exposition)
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
        "promtool: {}{}\n{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr),
        String::from_utf8_lossy(exposition)
    );
}

#[actix_rt::test]
async fn inbound_requests_are_counted_by_peer_identity_for_a_real_prometheus() {
    use support::mesh::{Pki, call};
    let app = RawUpstream::ok().await;
    let pki = Pki::new("metrics");
    let sidecar =
        Sidecar::start(&(pki.policy(app.addr) + "    authorization:\n      - from: [payments]\n"));
    let inbound = sidecar.inbound.expect("an inbound listener");
    let (payments, inventory) = (pki.peer("payments"), pki.peer("inventory"));
    for _ in 0..3 {
        assert_eq!(call(&payments, inbound, "").await, Ok(200));
    }
    for _ in 0..2 {
        assert_eq!(call(&inventory, inbound, "").await, Ok(403));
    }

    let exposition = request(sidecar.admin, "GET /metrics HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(exposition.status, 200);
    promtool_accepts(&exposition.body);

    let prometheus = Prometheus::scraping(sidecar.admin, "inbound");
    prometheus
        .until(r#"sum(http_server_request_duration_seconds_count{direction="inbound",service="inbound",peer="spiffe://mesh.test/service/payments",outcome="ok",status_class="2xx"})"#, 3.0)
        .await;
    prometheus
        .until(r#"sum(http_server_request_duration_seconds_count{direction="inbound",peer="spiffe://mesh.test/service/inventory",outcome="forbidden",status_class="4xx"})"#, 2.0)
        .await;
    sidecar.stop().await;
}

/// The value of the sample `series` (name and labels, as exposed) in a scrape; 0 when absent.
fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[actix_rt::test]
async fn every_refusal_is_counted_once_under_its_service_and_reason() {
    let upstream = RawUpstream::ok().await;
    let (held, arrived, release) = support::held_upstream().await;
    let sidecar = Sidecar::start(&format!(
        "services:\n  refusals-limited:\n    endpoints: ['{}']\n    rate_limit:\n      rate: 1/m\n      burst: 1\n  refusals-full:\n    endpoints: ['{held}']\n    concurrency:\n      max_in_flight: 1\n      queue: 0\n",
        upstream.addr
    ));
    let call = |service: &'static str| {
        let addr = sidecar.addr;
        async move {
            get(addr, "/", &[("target", service), ("internal", "true")])
                .await
                .status
        }
    };
    assert_eq!(call("refusals-limited").await, 200);
    for _ in 0..5 {
        assert_eq!(call("refusals-limited").await, 429);
    }
    let first = tokio::spawn(call("refusals-full"));
    tokio::time::timeout(DEADLINE, arrived.notified())
        .await
        .expect("the first request reaches the held upstream");
    for _ in 0..3 {
        assert_eq!(call("refusals-full").await, 503);
    }
    release.notify_one();
    assert_eq!(first.await.unwrap(), 200);

    let scrape = get(sidecar.admin, "/metrics", &[]).await.text();
    assert_eq!(
        sample(
            &scrape,
            "sidecar_rate_limited_total{service=\"refusals-limited\"}"
        ),
        5.0,
        "{scrape}"
    );
    assert_eq!(
        sample(
            &scrape,
            "sidecar_overloaded_total{service=\"refusals-full\",reason=\"queue_full\"}"
        ),
        3.0,
        "{scrape}"
    );
    assert_eq!(
        sample(
            &scrape,
            "sidecar_rate_limited_total{service=\"refusals-full\"}"
        ),
        0.0
    );
    sidecar.stop().await;
}

/// The sum of every sample of `name` whose labels include all of `labels`, in a scrape.
fn total(scrape: &str, name: &str, labels: &[&str]) -> f64 {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{'))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[actix_rt::test]
async fn two_sidecars_in_one_process_count_only_their_own() {
    // The same service name in both, on the same thread: what one counts must not show in the other's
    // scrape, neither the requests its workers served nor the transition its monitor actor reported.
    let failing = RawUpstream::start(|_| response(500, &[("content-length", "0")], b"")).await;
    let fine = RawUpstream::ok().await;
    let policy = |endpoint: std::net::SocketAddr| {
        format!(
            "services:\n  twins:\n    endpoints: ['{endpoint}']\n    retries:\n      max_retries: 0\n    circuit_breaker:\n      consecutive_failures: 2\n      failure_rate:\n        enabled: false\n"
        )
    };
    let first = Sidecar::start(&policy(failing.addr));
    let second = Sidecar::start(&policy(fine.addr));
    let call = |sidecar: &Sidecar| {
        let addr = sidecar.addr;
        async move {
            get(addr, "/", &[("target", "twins"), ("internal", "true")])
                .await
                .status
        }
    };
    for _ in 0..2 {
        assert_eq!(call(&first).await, 500);
    }
    assert_eq!(call(&first).await, 503, "the breaker is open");
    for _ in 0..4 {
        assert_eq!(call(&second).await, 200);
    }

    let opened = ["service=\"twins\"", "state=\"open\""];
    let scrape = |sidecar: &Sidecar| {
        let admin = sidecar.admin;
        async move { get(admin, "/metrics", &[]).await.text() }
    };
    support::eventually("the first sidecar's monitor counts the opening", || async {
        total(
            &scrape(&first).await,
            "sidecar_circuit_breaker_transitions_total",
            &opened,
        ) == 1.0
    })
    .await;
    let (one, two) = (scrape(&first).await, scrape(&second).await);
    let served = |s: &str, class: &str| {
        total(
            s,
            "http_server_request_duration_seconds_count",
            &["service=\"twins\"", &format!("status_class=\"{class}\"")],
        )
    };
    assert_eq!(
        (served(&one, "5xx"), served(&one, "2xx")),
        (3.0, 0.0),
        "{one}"
    );
    assert_eq!(
        (served(&two, "5xx"), served(&two, "2xx")),
        (0.0, 4.0),
        "{two}"
    );
    assert_eq!(
        total(&two, "sidecar_circuit_breaker_transitions_total", &opened),
        0.0,
        "{two}"
    );
    assert!(
        two.contains("sidecar_build_info"),
        "each registry has its own build info"
    );
    first.stop().await;
    second.stop().await;
}
