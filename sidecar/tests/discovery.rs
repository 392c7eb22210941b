//! Discovery stories: a real DNS server (dnsmasq, on a loopback port) whose records change during the test, a
//! hosts file rewritten during the test, the real sidecar, a real client.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly on purpose"
)]

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{RawUpstream, Sidecar, get, request};

/// dnsmasq serving a hosts file (A records, TTL 1 s) and fixed SRV records on a loopback port.
struct Dnsmasq {
    port: u16,
    hosts: PathBuf,
    child: Child,
    dir: PathBuf,
}

impl Dnsmasq {
    fn start(hosts: &str, srv: &[String]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "sidecar-dns-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let hosts_path = dir.join("hosts");
        std::fs::write(&hosts_path, hosts).unwrap();
        // dnsmasq listens on UDP and TCP: find a port free for both (the kernel numbers them separately).
        let port = loop {
            let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = tcp.local_addr().unwrap().port();
            if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
                break port;
            }
        };
        let binary = ["/usr/sbin/dnsmasq", "dnsmasq"]
            .into_iter()
            .find(|b| {
                Command::new(b)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .status()
                    .is_ok()
            })
            .expect("dnsmasq (Debian's dnsmasq-base; scripts/test.sh installs it)");
        let mut cmd = Command::new(binary);
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--local-ttl=1",
            "--pid-file=",
            "--log-facility=-",
        ])
        .arg(format!("--port={port}"))
        .arg(format!("--addn-hosts={}", hosts_path.display()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("log")).unwrap());
        if nix_is_root() {
            cmd.arg("--user=root");
        }
        for record in srv {
            cmd.arg(format!("--srv-host={record}"));
        }
        let child = cmd.spawn().expect("start dnsmasq");
        let mut dns = Self {
            port,
            hosts: hosts_path,
            child,
            dir,
        };
        dns.wait_ready();
        dns
    }

    /// Until dnsmasq answers a query (any answer will do).
    fn wait_ready(&mut self) {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        // A query for `ready.` type A, class IN.
        let query =
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05ready\x00\x00\x01\x00\x01";
        let mut answer = [0u8; 512];
        support::process::eventually_blocking("dnsmasq answers", || {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
                panic!("dnsmasq exited ({status}): {log}");
            }
            let _ = socket.send_to(query, ("127.0.0.1", self.port));
            socket.recv(&mut answer).is_ok()
        });
    }

    /// Rewrites the A records and tells dnsmasq to read them again.
    fn set_hosts(&self, hosts: &str) {
        std::fs::write(&self.hosts, hosts).unwrap();
        let status = Command::new("kill")
            .arg("-HUP")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false)
}

fn rand_suffix() -> usize {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as usize
}

async fn call(sidecar: &Sidecar) -> u16 {
    get(
        sidecar.addr,
        "/",
        &[("target", "orders"), ("internal", "true")],
    )
    .await
    .status
}

async fn metric(sidecar: &Sidecar, needle: &str) -> bool {
    request(sidecar.admin, "GET /metrics HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .text()
        .contains(needle)
}

/// Two instances on the same port of two loopback addresses, as two replicas behind one name.
async fn replicas() -> (RawUpstream, RawUpstream, u16) {
    loop {
        let a = RawUpstream::ok().await;
        let port = a.addr.port();
        if let Some(b) = RawUpstream::ok_on(&format!("127.0.0.2:{port}")).await {
            return (a, b, port);
        }
    }
}

#[actix_rt::test]
async fn a_changed_dns_record_is_followed_within_its_ttl_and_an_outage_keeps_the_last_set() {
    let (first, second, port) = replicas().await;
    let mut dns = Dnsmasq::start("127.0.0.1 orders.test\n", &[]);
    let sidecar = Sidecar::start(&format!(
        "dns:\n  nameservers: ['127.0.0.1:{}']\nservices:\n  orders:\n    discovery:\n      dns: orders.test\n      port: {port}\n      min_ttl: 100ms\n",
        dns.port
    ));
    // Until the first answer the service has no endpoint: wait for it.
    support::eventually("the first DNS answer", || async {
        call(&sidecar).await == 200
    })
    .await;
    assert_eq!(first.received().len(), 1);

    // The record moves to the other replica: followed within the TTL (1 s) and a resolution.
    dns.set_hosts("127.0.0.2 orders.test\n");
    let moved = Instant::now();
    support::eventually("the change followed", || async {
        assert_eq!(call(&sidecar).await, 200);
        !second.received().is_empty()
    })
    .await;
    let took = moved.elapsed();
    eprintln!("DNS change followed after {took:?}");
    assert!(
        took < Duration::from_millis(1_500),
        "followed after {took:?}, TTL 1 s"
    );
    // Once moved, everything goes to the new record.
    let before = first.received().len();
    for _ in 0..10 {
        assert_eq!(call(&sidecar).await, 200);
    }
    assert_eq!(first.received().len(), before);

    // DNS goes away: resolutions fail, the last good set keeps serving.
    dns.stop();
    support::eventually("a failed resolution counted", || async {
        assert_eq!(call(&sidecar).await, 200);
        metric(
            &sidecar,
            "sidecar_discovery_updates_total{service=\"orders\",result=\"failed\"}",
        )
        .await
    })
    .await;
    let served = second.received().len();
    for _ in 0..10 {
        assert_eq!(call(&sidecar).await, 200);
    }
    assert_eq!(second.received().len(), served + 10);
    sidecar.stop().await;
}

#[actix_rt::test]
async fn srv_records_give_host_and_port() {
    let upstream = RawUpstream::ok().await;
    let dns = Dnsmasq::start(
        "127.0.0.1 node1.test\n",
        &[format!(
            "_http._tcp.orders.test,node1.test,{}",
            upstream.addr.port()
        )],
    );
    let sidecar = Sidecar::start(&format!(
        "dns:\n  nameservers: ['127.0.0.1:{}']\nservices:\n  orders:\n    discovery:\n      srv: _http._tcp.orders.test\n",
        dns.port
    ));
    support::eventually("the SRV answer", || async { call(&sidecar).await == 200 }).await;
    assert_eq!(upstream.received().len(), 1);
    let targets = request(
        sidecar.admin,
        "GET /admin/targets HTTP/1.1\r\nhost: a\r\n\r\n",
    )
    .await
    .json();
    assert_eq!(
        targets["services"]["orders"]["endpoints"][0]["address"],
        format!("127.0.0.1:{}", upstream.addr.port())
    );
    sidecar.stop().await;
}

#[actix_rt::test]
async fn a_hosts_file_is_followed_when_it_changes() {
    let (a, b) = (RawUpstream::ok().await, RawUpstream::ok().await);
    let dir = std::env::temp_dir().join(format!(
        "sidecar-hosts-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("hosts.json");
    std::fs::write(&file, format!("[\"{}\"]", a.addr)).unwrap();
    let sidecar = Sidecar::start(&format!(
        "services:\n  orders:\n    discovery:\n      hosts_file: '{}'\n",
        file.display()
    ));
    support::eventually("the hosts file read", || async {
        call(&sidecar).await == 200
    })
    .await;
    // Replaced by rename, as editors and config maps do.
    let staged = dir.join("hosts.json.new");
    std::fs::write(&staged, format!("[\"{}\"]", b.addr)).unwrap();
    std::fs::rename(&staged, &file).unwrap();
    support::eventually("the new hosts file followed", || async {
        assert_eq!(call(&sidecar).await, 200);
        !b.received().is_empty()
    })
    .await;
    // A broken file keeps the last good set.
    std::fs::write(&file, "[\"half-writ").unwrap();
    for _ in 0..10 {
        assert_eq!(call(&sidecar).await, 200);
    }
    let _ = std::fs::remove_dir_all(&dir);
    sidecar.stop().await;
}

/// A hosts file in its own directory, replaced by rename as editors and config maps do.
struct HostsFile {
    dir: PathBuf,
    file: PathBuf,
}

impl HostsFile {
    fn new(hosts: &[std::net::SocketAddr]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "sidecar-hosts-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("hosts.json");
        let hosts_file = Self { dir, file };
        hosts_file.set(hosts);
        hosts_file
    }

    fn set(&self, hosts: &[std::net::SocketAddr]) {
        let staged = self.dir.join("hosts.json.new");
        let list: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
        std::fs::write(&staged, format!("[{}]", list.join(", "))).unwrap();
        std::fs::rename(&staged, &self.file).unwrap();
    }
}

impl Drop for HostsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn orders_state(sidecar: &Sidecar) -> serde_json::Value {
    request(
        sidecar.admin,
        "GET /admin/targets HTTP/1.1\r\nhost: a\r\n\r\n",
    )
    .await
    .json()["services"]["orders"]
        .clone()
}

/// Until the service has `n` endpoints.
async fn wait_endpoints(sidecar: &Sidecar, n: usize) {
    support::eventually(&format!("the service has {n} endpoints"), || async {
        let state = orders_state(sidecar).await;
        state["endpoints"].as_array().map_or(0, Vec::len) == n
    })
    .await;
}

/// Round robin, no retries and no service breaker, so that every failure shows; failing endpoints ejected
/// after 3 failures for a minute.
fn ejecting_policy(hosts: &HostsFile) -> String {
    format!(
        "services:\n  orders:\n    discovery:\n      hosts_file: '{}'\n    load_balancer:\n      policy: round_robin\n    retries:\n      max_retries: 0\n    circuit_breaker:\n      enabled: false\n    outlier_detection:\n      consecutive_failures: 3\n      base_ejection_time: 60s\n",
        hosts.file.display()
    )
}

#[actix_rt::test]
async fn an_endpoint_that_was_alone_is_ejected_once_discovery_adds_others() {
    // Issue 15, item 2: an endpoint created while it was its service's only one kept no breaker when
    // discovery added more: it answered 503 forever and was never ejected.
    let failing =
        RawUpstream::start(|_| support::response(503, &[("content-length", "0")], b"")).await;
    let ok = RawUpstream::ok().await;
    let hosts = HostsFile::new(&[failing.addr]);
    let sidecar = Sidecar::start(&ejecting_policy(&hosts));
    wait_endpoints(&sidecar, 1).await;
    hosts.set(&[failing.addr, ok.addr]);
    wait_endpoints(&sidecar, 2).await;

    let mut statuses = Vec::new();
    for _ in 0..40 {
        statuses.push(call(&sidecar).await);
    }
    assert_eq!(failing.received().len(), 3, "ejected after 3 failures");
    assert!(
        statuses[10..].iter().all(|&s| s == 200),
        "once ejected, every request is served: {statuses:?}"
    );
    assert_eq!(orders_state(&sidecar).await["ejected"], 1);
    sidecar.stop().await;
}

#[actix_rt::test]
async fn an_ejected_endpoint_left_alone_by_discovery_is_readmitted() {
    // The reverse: scaled in to one, an ejected endpoint has nowhere else to send its traffic; it is
    // readmitted at once (the service's breaker guards it from then on) rather than refusing every request
    // with 503 no-healthy-endpoint until its ejection ends.
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = healthy.clone();
    let flaky = RawUpstream::start(move |_| {
        if h.load(std::sync::atomic::Ordering::SeqCst) {
            support::response(200, &[("content-length", "2")], b"ok")
        } else {
            support::response(503, &[("content-length", "0")], b"")
        }
    })
    .await;
    let ok = RawUpstream::ok().await;
    let hosts = HostsFile::new(&[flaky.addr, ok.addr]);
    let sidecar = Sidecar::start(&ejecting_policy(&hosts));
    wait_endpoints(&sidecar, 2).await;
    for _ in 0..10 {
        call(&sidecar).await;
    }
    assert_eq!(orders_state(&sidecar).await["ejected"], 1);

    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    hosts.set(&[flaky.addr]);
    wait_endpoints(&sidecar, 1).await;
    let before = flaky.received().len();
    for _ in 0..5 {
        let reply = get(
            sidecar.addr,
            "/",
            &[("target", "orders"), ("internal", "true")],
        )
        .await;
        assert_eq!(
            (reply.status, reply.header("x-sidecar-error")),
            (200, None),
            "the only endpoint left serves"
        );
    }
    assert_eq!(flaky.received().len(), before + 5);
    let state = orders_state(&sidecar).await;
    assert_eq!(state["ejected"], 0, "{state}");
    sidecar.stop().await;
}
