//! Live reload: valid edits are applied whole, invalid ones are reported and change nothing, and traffic
//! flowing during edits never fails nor sees half of a policy.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::{Conn, DEADLINE, RawUpstream, Sidecar, get, request, response};

fn policy_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sidecar-reload-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes a file the way editors and config maps do: a temporary file renamed over the old one.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn orders_policy(endpoint: &RawUpstream) -> String {
    format!(
        "services:\n  orders:\n    endpoints: ['{}']\n",
        endpoint.addr
    )
}

/// An upstream that answers with its own name.
async fn named(name: &'static str) -> RawUpstream {
    RawUpstream::start(move |_| response(200, &[("content-length", "1")], name.as_bytes())).await
}

async fn admin_json(sidecar: &Sidecar, method: &str, path: &str) -> (u16, serde_json::Value) {
    let reply = request(
        sidecar.admin,
        &format!("{method} {path} HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\n\r\n"),
    )
    .await;
    (reply.status, reply.json())
}

/// Sends requests to `orders` until the answer is `want`, within the deadline.
async fn until_served_by(sidecar: &Sidecar, want: &str) {
    support::eventually("the new policy applied", || async {
        let reply = get(
            sidecar.addr,
            "/",
            &[("target", "orders"), ("internal", "true")],
        )
        .await;
        reply.status == 200 && reply.text() == want
    })
    .await;
}

#[actix_rt::test]
async fn a_valid_edit_is_picked_up_by_the_watcher_and_applied_whole() {
    let (a, b) = (named("A").await, named("B").await);
    let dir = policy_dir("watch");
    let file = dir.join("orders.yaml");
    std::fs::write(&file, orders_policy(&a)).unwrap();
    let sidecar = Sidecar::start_watching(&dir);
    until_served_by(&sidecar, "A").await;

    replace(&file, &orders_policy(&b));
    until_served_by(&sidecar, "B").await;

    let (status, body) = admin_json(&sidecar, "GET", "/admin/policy").await;
    assert_eq!(status, 200);
    assert_eq!(body["version"], 2);
    assert_eq!(body["reloads_applied"], 1);
    assert_eq!(body["last_reload"]["trigger"], "file change");
    assert_eq!(body["files"][0], file.display().to_string());
    sidecar.stop().await;
}

#[actix_rt::test]
async fn an_invalid_edit_keeps_the_old_policy_and_says_why_everywhere() {
    let a = named("A").await;
    let dir = policy_dir("invalid");
    let file = dir.join("orders.yaml");
    std::fs::write(&file, orders_policy(&a)).unwrap();
    // Not watched: the test's edits take effect only through the admin reload.
    let sidecar = Sidecar::start_path(&file);
    let (_, before) = admin_json(&sidecar, "GET", "/admin/policy").await;

    std::fs::write(&file, "services:\n  orders:\n    endpoints:\n      - 'ftp://nope'\n    timeouts:\n      request: 0s\n").unwrap();
    let (status, report) = admin_json(&sidecar, "POST", "/admin/reload").await;
    assert_eq!(status, 422, "{report}");
    assert_eq!(report["result"], "rejected");
    let errors: Vec<&str> = report["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    let name = file.display().to_string();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].starts_with(&format!("{name}:4:9: services.orders.endpoints[0]: ")),
        "{errors:?}"
    );
    assert!(
        errors[1].starts_with(&format!("{name}:6:7: services.orders.timeouts.request: ")),
        "{errors:?}"
    );

    // The old policy keeps serving, and the admin surface says what happened.
    let reply = get(
        sidecar.addr,
        "/",
        &[("target", "orders"), ("internal", "true")],
    )
    .await;
    assert_eq!(reply.text(), "A");
    let (_, after) = admin_json(&sidecar, "GET", "/admin/policy").await;
    assert_eq!(after["version"], before["version"]);
    assert_eq!(after["hash"], before["hash"]);
    assert_eq!(after["reloads_rejected"], 1);
    assert_eq!(after["last_error"]["errors"][0], errors[0]);
    sidecar.stop().await;
}

#[actix_rt::test]
async fn reloading_an_unchanged_policy_changes_nothing() {
    let a = named("A").await;
    let dir = policy_dir("unchanged");
    let file = dir.join("orders.yaml");
    std::fs::write(&file, orders_policy(&a)).unwrap();
    let sidecar = Sidecar::start_path(&file);
    let (status, report) = admin_json(&sidecar, "POST", "/admin/reload").await;
    assert_eq!(status, 200);
    assert_eq!(report["result"], "unchanged");
    assert_eq!(report["version"], 1);
    sidecar.stop().await;
}

/// A loopback socket on a free port, and a policy line naming it.
fn socket() -> (std::net::TcpListener, std::net::SocketAddr) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

fn free_addr() -> std::net::SocketAddr {
    socket().1
}

fn with_listeners(
    egress: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    workers: usize,
    rest: &str,
) -> String {
    format!("listeners:\n  egress: {egress}\n  admin: {admin}\n  workers: {workers}\n{rest}")
}

#[actix_rt::test]
async fn a_moved_admin_listener_leaves_egress_connections_alone() {
    let a = named("A").await;
    let dir = policy_dir("move-admin");
    let file = dir.join("p.yaml");
    let ((egress, egress_addr), (admin, admin_addr)) = (socket(), socket());
    std::fs::write(
        &file,
        with_listeners(egress_addr, admin_addr, 1, &orders_policy(&a)),
    )
    .unwrap();
    let sidecar = Sidecar::start_exact(&file, egress, admin);

    // An app connection, kept alive across the change.
    let mut app = Conn::open(sidecar.addr).await;
    let call = b"GET / HTTP/1.1\r\nhost: x\r\ntarget: orders\r\ninternal: true\r\n\r\n";
    app.send(call).await;
    assert_eq!(app.read(false).await.text(), "A");

    let new_admin = free_addr();
    std::fs::write(
        &file,
        with_listeners(egress_addr, new_admin, 1, &orders_policy(&a)),
    )
    .unwrap();
    let (status, report) = admin_json(&sidecar, "POST", "/admin/reload").await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        report["listener_changes"][0],
        format!("admin listener moved to {new_admin}"),
        "{report}"
    );
    assert_eq!(report["restart_required"], serde_json::json!([]));

    let moved = request(new_admin, "GET /admin/policy HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(moved.status, 200);
    assert_eq!(moved.json()["version"], 2);
    app.send(call).await;
    assert_eq!(
        app.read(false).await.text(),
        "A",
        "the app's connection was disturbed"
    );
    sidecar.stop().await;
}

#[actix_rt::test]
async fn a_moved_egress_listener_serves_at_once_and_lets_requests_in_flight_finish() {
    let (slow, slow_started, release) = support::held_upstream().await;
    let a = named("A").await;
    let dir = policy_dir("move-egress");
    let file = dir.join("p.yaml");
    let ((egress, egress_addr), (admin, admin_addr)) = (socket(), socket());
    std::fs::write(
        &file,
        with_listeners(egress_addr, admin_addr, 1, &orders_policy(&a)),
    )
    .unwrap();
    let sidecar = Sidecar::start_exact(&file, egress, admin);

    // A request in flight on the old listener.
    let in_flight = tokio::spawn(async move {
        get(egress_addr, "/", &[("target", &format!("http://{slow}/"))]).await
    });
    slow_started.notified().await;

    let new_egress = free_addr();
    std::fs::write(
        &file,
        with_listeners(new_egress, admin_addr, 2, &orders_policy(&a)),
    )
    .unwrap();
    let (status, report) = admin_json(&sidecar, "POST", "/admin/reload").await;
    assert_eq!(status, 200, "{report}");
    assert!(
        report["listener_changes"][0]
            .as_str()
            .unwrap()
            .starts_with(&format!(
                "egress listener restarted on {new_egress} with 2 worker(s)"
            )),
        "{report}"
    );

    let moved = get(
        new_egress,
        "/",
        &[("target", "orders"), ("internal", "true")],
    )
    .await;
    assert_eq!(moved.text(), "A");
    // The old address refuses new connections at once, though the old server still has a request to finish:
    // a client fails over from a refusal faster than from a connection accepted and then reset.
    support::eventually("the old egress address refuses connections", || async {
        matches!(
            tokio::net::TcpStream::connect(egress_addr).await,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
    })
    .await;
    release.notify_one();
    let finished = in_flight.await.unwrap();
    assert_eq!(finished.status, 200);
    assert_eq!(finished.text(), "slow");
    sidecar.stop().await;
}

#[actix_rt::test]
async fn an_egress_address_already_taken_is_reported_and_the_old_listener_stays() {
    let a = named("A").await;
    let dir = policy_dir("taken");
    let file = dir.join("p.yaml");
    let ((egress, egress_addr), (admin, admin_addr)) = (socket(), socket());
    std::fs::write(
        &file,
        with_listeners(egress_addr, admin_addr, 1, &orders_policy(&a)),
    )
    .unwrap();
    let sidecar = Sidecar::start_exact(&file, egress, admin);
    let (_taken, taken_addr) = socket();
    std::fs::write(
        &file,
        with_listeners(taken_addr, admin_addr, 1, &orders_policy(&a)),
    )
    .unwrap();
    let (status, report) = admin_json(&sidecar, "POST", "/admin/reload").await;
    assert_eq!(status, 200, "{report}");
    assert!(
        report["restart_required"][0]
            .as_str()
            .unwrap()
            .starts_with(&format!("listeners.egress: cannot move to {taken_addr}")),
        "{report}"
    );
    let still = get(
        egress_addr,
        "/",
        &[("target", "orders"), ("internal", "true")],
    )
    .await;
    assert_eq!(still.text(), "A");
    sidecar.stop().await;
}

/// The version each upstream expects to see in `x-policy`: a request routed by one version and patched by
/// another would be answered 500.
async fn strict(name: &'static str, served: Arc<AtomicUsize>) -> RawUpstream {
    RawUpstream::start(move |req| {
        if req.header("x-policy") == Some(name) {
            served.fetch_add(1, Ordering::Relaxed);
            response(200, &[("content-length", "2")], b"ok")
        } else {
            response(500, &[("content-length", "5")], b"mixed")
        }
    })
    .await
}

fn versioned(name: &str, upstream: &RawUpstream) -> String {
    format!(
        "dispatch:\n  key: x-client\n  destination: {url}\n  rewrites:\n    load:\n      destination: {url}\n      patch:\n        - key: x-policy\n          val: {name}\n",
        url = upstream.url("")
    )
}

#[actix_rt::test]
async fn traffic_during_alternating_valid_and_invalid_edits_never_fails_nor_sees_half_a_policy() {
    const RATE_PER_SEC: u64 = 2_000;
    const RUN: Duration = Duration::from_secs(30);
    const CONNECTIONS: u64 = 8;
    let (served_a, served_b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let a = strict("A", served_a.clone()).await;
    let b = strict("B", served_b.clone()).await;
    let dir = policy_dir("soak");
    let file = dir.join("dispatch.yaml");
    std::fs::write(&file, versioned("A", &a)).unwrap();
    let sidecar = Sidecar::start_watching(&dir);

    // The editor: every 500 ms, a valid switch to the other upstream, then an invalid edit.
    let editor = {
        let (file, a_text, b_text) = (file.clone(), versioned("A", &a), versioned("B", &b));
        tokio::spawn(async move {
            let start = Instant::now();
            let mut step = 0u32;
            while start.elapsed() < RUN {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let text = match step % 4 {
                    0 => b_text.clone(),
                    2 => a_text.clone(),
                    _ => "dispatch:\n  key: x-client\n  destinaton: http://typo\n".to_string(),
                };
                replace(&file, &text);
                step += 1;
            }
            step
        })
    };

    // The load: CONNECTIONS keep-alive connections, each paced to its share of the rate.
    let sent = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        let (addr, sent) = (sidecar.addr, sent.clone());
        clients.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            let mut tick = tokio::time::interval(Duration::from_micros(
                1_000_000 * CONNECTIONS / RATE_PER_SEC,
            ));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let start = Instant::now();
            let mut failures = Vec::new();
            while start.elapsed() < RUN {
                tick.tick().await;
                conn.send(b"GET /load HTTP/1.1\r\nhost: app\r\nx-client: load\r\n\r\n")
                    .await;
                let reply = conn.read(false).await;
                sent.fetch_add(1, Ordering::Relaxed);
                if reply.status != 200 {
                    failures.push(format!("{} {}", reply.status, reply.text()));
                }
            }
            failures
        }));
    }
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(c.await.unwrap());
    }
    let edits = editor.await.unwrap();

    let total = sent.load(Ordering::Relaxed);
    let (to_a, to_b) = (
        served_a.load(Ordering::Relaxed),
        served_b.load(Ordering::Relaxed),
    );
    let (_, status) = admin_json(&sidecar, "GET", "/admin/policy").await;
    eprintln!(
        "{total} requests in {RUN:?} ({to_a} to A, {to_b} to B); {edits} edits; applied {}, rejected {}",
        status["reloads_applied"], status["reloads_rejected"]
    );
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // A guard that the story ran under real load, not a throughput test (that is bench/'s): a loaded 2-core
    // machine was seen to pace 36k to 51k of the 60k, and every one of them was answered.
    assert!(
        total >= RATE_PER_SEC * RUN.as_secs() / 2,
        "only {total} requests were sent"
    );
    assert!(to_a > 0 && to_b > 0, "the policy never switched");
    assert!(
        status["reloads_applied"].as_u64().unwrap() >= 10,
        "{status}"
    );
    assert!(
        status["reloads_rejected"].as_u64().unwrap() >= 10,
        "{status}"
    );
    sidecar.stop().await;
}

#[actix_rt::test]
async fn a_request_timeout_change_applies_at_once_without_a_restart() {
    let a = named("A").await;
    let dir = policy_dir("timeout");
    let file = dir.join("p.yaml");
    std::fs::write(&file, orders_policy(&a)).unwrap();
    let sidecar = Sidecar::start_path(&file);
    std::fs::write(
        &file,
        format!(
            "defaults:\n  timeouts:\n    request: 3s\n{}",
            orders_policy(&a)
        ),
    )
    .unwrap();
    let (status, report) = admin_json(&sidecar, "POST", "/admin/reload").await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["result"], "applied");
    assert_eq!(
        report["restart_required"],
        serde_json::json!([]),
        "{report}"
    );
    sidecar.stop().await;
}

/// Regression (issue 15 item 7): editors that truncate a file and then write it leave it empty for a moment; the
/// watcher applied that empty policy, and every request to a service failed until the write (840 failures in
/// seven edits). The empty file is now refused and the old policy keeps serving.
#[actix_rt::test]
async fn truncate_then_write_edits_under_steady_traffic_lose_no_request() {
    use std::sync::atomic::AtomicBool;
    const EDITS: usize = 7;
    // Longer than the debounce below, as a slow editor (or a large file) would leave it.
    const EDITOR_PAUSE: Duration = Duration::from_millis(200);
    let (a, b) = (named("A").await, named("B").await);
    let dir = policy_dir("truncate");
    let file = dir.join("orders.yaml");
    std::fs::write(&file, orders_policy(&a)).unwrap();
    let sidecar = Sidecar::start_source(sidecar::control::store::PolicySource {
        policy: Some(file.clone()),
        watch: true,
        reload_debounce: Some(Duration::from_millis(50)),
        ..sidecar::control::store::PolicySource::default()
    });
    until_served_by(&sidecar, "A").await;

    let done = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (addr, done, sent) = (sidecar.addr, done.clone(), sent.clone());
        clients.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            let mut failures = Vec::new();
            while !done.load(Ordering::Relaxed) {
                conn.send(
                    b"GET / HTTP/1.1\r\nhost: app\r\ntarget: orders\r\ninternal: true\r\n\r\n",
                )
                .await;
                let reply = conn.read(false).await;
                sent.fetch_add(1, Ordering::Relaxed);
                if reply.status != 200 {
                    failures.push(format!("{} {}", reply.status, reply.text()));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            failures
        }));
    }

    let start = Instant::now();
    for edit in 0..EDITS {
        let (next, name) = if edit % 2 == 0 { (&b, "B") } else { (&a, "A") };
        // Truncate, pause, write: the file is empty in between.
        drop(std::fs::File::create(&file).unwrap());
        tokio::time::sleep(EDITOR_PAUSE).await;
        std::fs::write(&file, orders_policy(next)).unwrap();
        until_served_by(&sidecar, name).await;
    }
    done.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(c.await.unwrap());
    }
    let took = start.elapsed();

    let (_, status) = admin_json(&sidecar, "GET", "/admin/policy").await;
    let total = sent.load(Ordering::Relaxed);
    eprintln!(
        "{total} requests during {EDITS} edits in {took:?}; applied {}, rejected {}",
        status["reloads_applied"], status["reloads_rejected"]
    );
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(status["reloads_applied"], EDITS, "{status}");
    assert!(
        status["reloads_rejected"].as_u64().unwrap() >= 1,
        "the empty moments were never seen: {status}"
    );
    assert!(status["last_error"].is_null(), "{status}");
    assert!(took < DEADLINE, "{EDITS} edits took {took:?}");
    sidecar.stop().await;
}

/// Regression (issue 15 item 13): `last_error` kept showing the error of a file that had since been fixed and
/// applied, so an operator could not tell a broken file on disk from an old mistake.
#[actix_rt::test]
async fn last_error_clears_once_the_fixed_file_is_applied() {
    let (a, b) = (named("A").await, named("B").await);
    let dir = policy_dir("last-error");
    let file = dir.join("orders.yaml");
    std::fs::write(&file, orders_policy(&a)).unwrap();
    let sidecar = Sidecar::start_path(&file);

    std::fs::write(&file, "services:\n  orders:\n    endpoints: []\n").unwrap();
    let (status, _) = admin_json(&sidecar, "POST", "/admin/reload").await;
    assert_eq!(status, 422);
    let (_, policy) = admin_json(&sidecar, "GET", "/admin/policy").await;
    assert_eq!(policy["last_error"]["result"], "rejected", "{policy}");

    std::fs::write(&file, orders_policy(&b)).unwrap();
    let (status, report) = admin_json(&sidecar, "POST", "/admin/reload").await;
    assert_eq!(status, 200, "{report}");
    let (_, policy) = admin_json(&sidecar, "GET", "/admin/policy").await;
    assert!(policy["last_error"].is_null(), "{policy}");
    assert_eq!(policy["reloads_rejected"], 1, "the history stays counted");
    sidecar.stop().await;
}

/// Regression (issue 14 item 8): `POST /admin/reload` with `Origin: http://evil.example` was accepted, so any page
/// a browser on this machine opened could make it reload (or, later, change) the sidecar.
#[actix_rt::test]
async fn cross_site_admin_requests_are_refused_and_local_tools_still_work() {
    let a = named("A").await;
    let dir = policy_dir("cross-site");
    let file = dir.join("orders.yaml");
    std::fs::write(&file, orders_policy(&a)).unwrap();
    let sidecar = Sidecar::start_path(&file);
    let port = sidecar.admin.port();
    let post = |extra: String| {
        let admin = sidecar.admin;
        async move {
            request(
                admin,
                &format!("POST /admin/reload HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n{extra}content-length: 0\r\n\r\n"),
            )
            .await
        }
    };

    // What a browser sends when a page elsewhere posts to the admin listener.
    for extra in [
        "origin: http://evil.example\r\n".to_string(),
        "origin: null\r\n".to_string(),
        format!("origin: http://127.0.0.1:{}\r\n", port.wrapping_add(1)),
        format!("origin: https://127.0.0.1:{port}\r\n"),
        "sec-fetch-site: cross-site\r\n".to_string(),
        "sec-fetch-site: same-site\r\n".to_string(),
        "content-type: application/x-www-form-urlencoded\r\n".to_string(),
        "content-type: text/plain;charset=UTF-8\r\n".to_string(),
    ] {
        let reply = post(extra.clone()).await;
        assert_eq!(reply.status, 403, "{extra:?}: {}", reply.text());
        let body = reply.json();
        assert_eq!(body["error"], "cross-site-request", "{extra:?}: {body}");
        assert!(
            body["detail"].as_str().unwrap().starts_with("refused: "),
            "{body}"
        );
    }
    let (_, status) = admin_json(&sidecar, "GET", "/admin/policy").await;
    assert!(
        status["last_reload"].is_null(),
        "a refused request reloaded: {status}"
    );

    // The listener's own origin, and tools that send no Origin, are served.
    for extra in [
        format!("origin: http://127.0.0.1:{port}\r\n"),
        format!("origin: http://localhost:{port}\r\nsec-fetch-site: same-origin\r\n"),
        "content-type: application/json\r\n".to_string(),
        String::new(),
    ] {
        let reply = post(extra.clone()).await;
        assert_eq!(reply.status, 200, "{extra:?}: {}", reply.text());
    }
    // curl, run off this thread: the policy store answering it lives here.
    let url = format!("http://127.0.0.1:{port}/admin/reload");
    let curl = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args([
                "-s",
                "-m",
                "10",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
            ])
            .arg(url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&curl.stdout), "200");

    // Reads are not refused: a browser keeps a foreign page from seeing the answer anyway.
    let read = request(
        sidecar.admin,
        "GET /admin/policy HTTP/1.1\r\nhost: a\r\norigin: http://evil.example\r\n\r\n",
    )
    .await;
    assert_eq!(read.status, 200);
    sidecar.stop().await;
}

/// Clients that each send requests one after another on their own keep-alive connection until `stop`; each
/// returns how many it sent, or panics on the first request that was not answered 200.
struct Steady {
    sent: Arc<AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<usize>>,
}

impl Steady {
    /// Raw clients that never reconnect: a connection closed under them is a lost request.
    fn raw(addr: std::net::SocketAddr, n: usize) -> Self {
        Self::start(n, move |sent, stop| async move {
            let mut conn = Conn::open(addr).await;
            let mut mine = 0;
            while !stop.load(Ordering::Relaxed) {
                conn.send(b"GET / HTTP/1.1\r\nhost: x\r\ntarget: orders\r\ninternal: true\r\n\r\n")
                    .await;
                let reply = conn.read(false).await;
                assert_eq!(reply.status, 200, "{}", reply.head);
                assert_eq!(reply.header("connection"), None, "{}", reply.head);
                mine += 1;
                sent.fetch_add(1, Ordering::Relaxed);
            }
            mine
        })
    }

    /// awc clients: pooled keep-alive connections, left when a response says `Connection: close`.
    fn awc(addr: std::net::SocketAddr, n: usize) -> Self {
        Self::start(n, move |sent, stop| async move {
            let client = awc::Client::default();
            let mut mine = 0;
            while !stop.load(Ordering::Relaxed) {
                let mut res = client
                    .get(format!("http://{addr}/"))
                    .insert_header(("target", "orders"))
                    .insert_header(("internal", "true"))
                    .send()
                    .await
                    .expect("every request is answered");
                assert_eq!(res.status(), 200);
                assert_eq!(res.body().await.expect("the whole body").as_ref(), b"A");
                mine += 1;
                sent.fetch_add(1, Ordering::Relaxed);
            }
            mine
        })
    }

    fn start<F, Fut>(n: usize, client: F) -> Self
    where
        F: Fn(Arc<AtomicUsize>, Arc<std::sync::atomic::AtomicBool>) -> Fut,
        Fut: std::future::Future<Output = usize> + 'static,
    {
        let sent = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let clients = (0..n)
            .map(|_| actix_rt::spawn(client(sent.clone(), stop.clone())))
            .collect();
        Self {
            sent,
            stop,
            clients,
        }
    }

    /// Waits until `more` requests have been answered since the call.
    async fn answered(&self, more: usize) {
        let goal = self.sent.load(Ordering::Relaxed) + more;
        support::eventually(&format!("{more} more requests answered"), || async {
            if self.sent.load(Ordering::Relaxed) >= goal {
                return true;
            }
            assert!(
                self.clients.iter().all(|c| !c.is_finished()),
                "a client failed"
            );
            false
        })
        .await;
    }

    /// Stops the clients; every one of them must have had every request answered.
    async fn finish(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for client in self.clients {
            total += client.await.expect("no request was lost");
        }
        total
    }
}

#[actix_rt::test]
async fn a_pool_change_under_keep_alive_traffic_loses_nothing_and_needs_no_new_listener() {
    let a = named("A").await;
    let dir = policy_dir("pool-change");
    let file = dir.join("p.yaml");
    let pool = |idle: &str| {
        format!(
            "defaults:\n  pool:\n    idle_timeout: {idle}\n{}",
            orders_policy(&a)
        )
    };
    std::fs::write(&file, pool("4s")).unwrap();
    let sidecar = Sidecar::start_path(&file);
    let traffic = Steady::raw(sidecar.addr, 4);
    traffic.answered(100).await;
    let upstream_connections = a.connections();

    std::fs::write(&file, pool("3s")).unwrap();
    let (status, report) = admin_json(&sidecar, "POST", "/admin/reload").await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        report["listener_changes"],
        serde_json::json!([]),
        "{report}"
    );
    traffic.answered(200).await;
    assert!(traffic.finish().await >= 300);
    assert!(
        a.connections() > upstream_connections,
        "the workers kept the client of the old pool settings"
    );
    sidecar.stop().await;
}

#[actix_rt::test]
async fn a_worker_count_change_under_keep_alive_traffic_loses_nothing_for_a_client_that_honours_close()
 {
    let a = named("A").await;
    let dir = policy_dir("workers-change");
    let file = dir.join("p.yaml");
    let listeners = |workers: usize| {
        format!(
            "listeners:\n  workers: {workers}\n  drain_timeout: 1s\n{}",
            orders_policy(&a)
        )
    };
    std::fs::write(&file, listeners(1)).unwrap();
    let sidecar = Sidecar::start_path(&file);
    let traffic = Steady::awc(sidecar.addr, 4);
    traffic.answered(100).await;
    // And a connection that is idle when the reload comes: the old server must not close it under the app.
    let mut idle = Conn::open(sidecar.addr).await;
    let call = b"GET / HTTP/1.1\r\nhost: x\r\ntarget: orders\r\ninternal: true\r\n\r\n";
    idle.send(call).await;
    assert_eq!(idle.read(false).await.header("connection"), None);

    std::fs::write(&file, listeners(2)).unwrap();
    let (status, report) = admin_json(&sidecar, "POST", "/admin/reload").await;
    assert_eq!(status, 200, "{report}");
    assert!(
        report["listener_changes"][0]
            .as_str()
            .unwrap()
            .starts_with("egress listener restarted"),
        "{report}"
    );
    let reloaded = Instant::now();
    // The idle connection's next request, a moment later, is answered, and told to leave.
    tokio::time::sleep(Duration::from_millis(100)).await;
    idle.send(call).await;
    let last = idle.read(false).await;
    assert_eq!(last.status, 200, "{}", last.head);
    assert_eq!(last.header("connection"), Some("close"), "{}", last.head);
    assert!(idle.closed().await);
    // Past the old server's grace (drain_timeout), so its idle connections have been closed under the traffic.
    while reloaded.elapsed() < Duration::from_millis(1200) {
        traffic.answered(10).await;
    }
    traffic.answered(100).await;
    assert!(traffic.finish().await >= 200);
    sidecar.stop().await;
}

/// Regression (issue 16 item 5): a reload that changed the policy of a discovered service rebuilt it with its
/// static endpoints (none), so it answered 503 `no-endpoints` until discovery published its set again, up to
/// 200 ms later. The rebuilt service now keeps the endpoints discovery gave it.
#[actix_rt::test]
async fn editing_a_discovered_services_policy_under_steady_traffic_loses_no_request() {
    const EDITS: u64 = 10;
    let a = named("A").await;
    let dir = policy_dir("discovered-edit");
    let hosts = dir.join("hosts.json");
    std::fs::write(&hosts, format!("[\"{}\"]", a.addr)).unwrap();
    let file = dir.join("p.yaml");
    let policy = |seconds: u64| {
        format!(
            "services:\n  orders:\n    discovery:\n      hosts_file: '{}'\n    timeouts:\n      request: {seconds}s\n",
            hosts.display()
        )
    };
    std::fs::write(&file, policy(10)).unwrap();
    let sidecar = Sidecar::start_path(&file);
    until_served_by(&sidecar, "A").await;

    let traffic = Steady::raw(sidecar.addr, 4);
    traffic.answered(50).await;
    let mut every = tokio::time::interval(Duration::from_millis(200));
    for edit in 1..=EDITS {
        every.tick().await;
        replace(&file, &policy(10 + edit));
        let (status, report) = admin_json(&sidecar, "POST", "/admin/reload").await;
        assert_eq!(
            (status, &report["result"]),
            (200, &"applied".into()),
            "{report}"
        );
        // Requests right after the swap, before discovery's next tick could have put the endpoints back.
        traffic.answered(20).await;
    }
    assert!(traffic.finish().await >= 50 + 20 * EDITS as usize);
    let _ = std::fs::remove_dir_all(&dir);
    sidecar.stop().await;
}
