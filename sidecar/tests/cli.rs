//! The binary: start-up, the seed dispatcher's configuration habits, and `sidecar check`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

mod support;

use support::process::{SidecarProcess, run_to_end, sidecar_bin};
use support::{RawUpstream, get, request};

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sidecar-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn check_accepts_the_embedded_default() {
    let mut cmd = sidecar_bin();
    cmd.arg("check")
        .env_remove("SIDECAR_CONFIG")
        .env_remove("SIDECAR_POLICY");
    let out = run_to_end(cmd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("embedded default policy: ok"));
}

#[test]
fn check_lists_services_and_fails_with_every_error() {
    let dir = temp_dir("check");
    let good = dir.join("good.yaml");
    std::fs::write(
        &good,
        "services:\n  orders:\n    endpoints: ['127.0.0.1:8080']\n",
    )
    .unwrap();
    let mut cmd = sidecar_bin();
    cmd.arg("check").arg(&good).current_dir(&dir);
    let out = run_to_end(cmd);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("service orders: 1 endpoint(s) [http://127.0.0.1:8080]")
    );

    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "services:\n  a:\n    endpoints: []\n  b:\n    endpoints: ['nope']\n",
    )
    .unwrap();
    let mut cmd = sidecar_bin();
    cmd.arg("check").arg(&bad).current_dir(&dir);
    let out = run_to_end(cmd);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("services.a.endpoints: must list at least one endpoint"),
        "{err}"
    );
    assert!(err.contains("services.b.endpoints[0]"), "{err}");
}

#[test]
fn a_missing_dispatch_config_stops_start_up_naming_the_file() {
    let dir = temp_dir("missing");
    let mut cmd = sidecar_bin();
    cmd.env("SIDECAR_CONFIG", dir.join("nope.yaml"))
        .env("SIDECAR_PORT", "0");
    let out = run_to_end(cmd);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nope.yaml: cannot read dispatch config"),
        "{err}"
    );
}

#[test]
fn an_invalid_dispatch_config_stops_start_up_with_line_and_reason() {
    let dir = temp_dir("invalid");
    let file = dir.join("config.yaml");
    std::fs::write(&file, "key: environment\ndestinaton: http://example.org\n").unwrap();
    let mut cmd = sidecar_bin();
    cmd.env("SIDECAR_CONFIG", &file).env("SIDECAR_PORT", "0");
    let out = run_to_end(cmd);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config.yaml:2:1: unknown field `destinaton`"),
        "{err}"
    );
}

#[actix_rt::test]
async fn a_seed_config_yaml_in_the_working_directory_runs_unchanged() {
    let upstream = RawUpstream::ok().await;
    let dir = temp_dir("seed");
    std::fs::write(
        dir.join("config.yaml"),
        format!(
            "rewrites:\n  dev:\n    patch:\n      - key: Host\n        val: example.com\n      - key: dispatched\n        val: true\n    destination: {}\nkey: environment\ndestination: {}\n",
            upstream.url(""),
            upstream.url("/default")
        ),
    )
    .unwrap();
    let mut cmd = sidecar_bin();
    cmd.current_dir(&dir)
        .env_remove("SIDECAR_CONFIG")
        .env_remove("SIDECAR_POLICY");
    let sidecar = SidecarProcess::spawn(cmd);

    assert_eq!(
        get(sidecar.addr, "/x", &[("environment", "dev")])
            .await
            .status,
        200
    );
    assert_eq!(
        request(sidecar.addr, "GET /y HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .status,
        200
    );
    let seen = upstream.wait_for(2).await;
    assert_eq!(seen[0].target, "/x");
    assert_eq!(seen[0].header("host"), Some("example.com"));
    assert_eq!(seen[0].header("dispatched"), Some("true"));
    assert_eq!(seen[1].target, "/default/y");
}

#[actix_rt::test]
async fn sidecar_port_accepts_the_seed_form_with_a_colon() {
    let upstream = RawUpstream::ok().await;
    let port = support::process::free_port();
    let mut cmd = sidecar_bin();
    // The admin listener on a port of its own: a sidecar already running on this machine (the README's first
    // command) holds the default 9901.
    cmd.env("SIDECAR_PORT", format!(":{port}"))
        .env_remove("SIDECAR_CONFIG")
        .args(["--admin", "127.0.0.1:0"]);
    let child = cmd.stderr(std::process::Stdio::null()).spawn().unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = Kill(child);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    support::eventually(&format!("the sidecar listens on {addr}"), || async {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;
    assert_eq!(
        get(addr, "/", &[("target", &upstream.url(""))])
            .await
            .status,
        200
    );
}

#[actix_rt::test]
async fn sighup_reloads_the_policy() {
    let dir = temp_dir("sighup");
    let file = dir.join("policy.yaml");
    std::fs::write(
        &file,
        "services:\n  orders:\n    endpoints: ['127.0.0.1:9']\n",
    )
    .unwrap();
    let admin_port = support::process::free_port();
    let mut cmd = sidecar_bin();
    cmd.arg("--policy").arg(&file).env_remove("SIDECAR_CONFIG");
    let sidecar = SidecarProcess::spawn_with_admin(cmd, admin_port);
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin_port));

    sidecar.signal("HUP");
    support::eventually("SIGHUP reloads the policy", || async {
        let reply = request(admin, "GET /admin/policy HTTP/1.1\r\nhost: a\r\n\r\n").await;
        reply.json()["last_reload"]["trigger"] == "SIGHUP"
    })
    .await;
    let reply = request(admin, "GET /admin/policy HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(reply.json()["last_reload"]["result"], "unchanged");
}

async fn readyz(admin: std::net::SocketAddr) -> u16 {
    request(admin, "GET /readyz HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .status
}

#[actix_rt::test]
async fn sigterm_turns_readiness_off_lets_requests_in_flight_finish_then_exits_zero() {
    let (upstream, arrived, release) = support::held_upstream().await;
    let admin_port = support::process::free_port();
    let mut cmd = sidecar_bin();
    cmd.env_remove("SIDECAR_CONFIG")
        .env_remove("SIDECAR_POLICY");
    let mut sidecar = SidecarProcess::spawn_with_admin(cmd, admin_port);
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin_port));
    assert_eq!(readyz(admin).await, 200);

    let addr = sidecar.addr;
    let in_flight = tokio::spawn(async move {
        get(addr, "/slow", &[("target", &format!("http://{upstream}"))]).await
    });
    arrived.notified().await;
    sidecar.signal("TERM");
    support::eventually("readiness turns off", || async {
        readyz(admin).await == 503
    })
    .await;
    release.notify_one();
    let reply = in_flight.await.unwrap();
    assert_eq!((reply.status, reply.text()), (200, "slow".to_string()));
    let status = sidecar.exit_status(support::DEADLINE);
    assert_eq!(status.code(), Some(0), "{status}");
}

#[actix_rt::test]
async fn a_second_signal_exits_at_once() {
    let (upstream, arrived, _never) = support::held_upstream().await;
    let admin_port = support::process::free_port();
    let mut cmd = sidecar_bin();
    cmd.env_remove("SIDECAR_CONFIG")
        .env_remove("SIDECAR_POLICY");
    let mut sidecar = SidecarProcess::spawn_with_admin(cmd, admin_port);
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin_port));
    let addr = sidecar.addr;
    let _in_flight = tokio::spawn(async move {
        get(addr, "/held", &[("target", &format!("http://{upstream}"))]).await
    });
    arrived.notified().await;
    sidecar.signal("INT");
    // Once the drain has begun (readiness is off), a second signal ends it: the drain would otherwise wait up to
    // 15 s for the held request.
    support::eventually("the first signal starts the drain", || async {
        readyz(admin).await == 503
    })
    .await;
    sidecar.signal("INT");
    let status = sidecar.exit_status(std::time::Duration::from_secs(5));
    assert_eq!(status.code(), Some(1), "{status}");
}

#[actix_rt::test]
async fn every_request_gets_one_json_access_log_line_on_stdout() {
    use std::io::BufRead;
    let upstream =
        RawUpstream::start(|_| support::response(201, &[("content-length", "5")], b"hello")).await;
    let mut cmd = sidecar_bin();
    cmd.args(["--access-log", "on"])
        .env_remove("SIDECAR_CONFIG")
        .env_remove("SIDECAR_POLICY");
    let (sidecar, stdout) = SidecarProcess::spawn_capturing_stdout(cmd);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });

    let raw = format!(
        "POST /orders/7?token=secret HTTP/1.1\r\nhost: x\r\ntarget: {}\r\ncontent-length: 3\r\n\r\nabc",
        upstream.url("")
    );
    assert_eq!(request(sidecar.addr, &raw).await.status, 201);
    assert_eq!(get(sidecar.addr, "/nowhere", &[]).await.status, 400);

    let next = || -> serde_json::Value {
        let line = rx
            .recv_timeout(support::DEADLINE)
            .expect("an access log line");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    };
    let ok = next();
    assert_eq!(ok["method"], "POST");
    assert_eq!(ok["service"], "external");
    assert_eq!(ok["path"], "/orders/7", "the query is left out by default");
    assert_eq!(ok["status"], 201);
    assert_eq!(ok["upstream"], upstream.addr.to_string());
    assert_eq!(ok["attempts"], 1);
    assert_eq!(ok["bytes_in"], 3);
    assert_eq!(ok["bytes_out"], 5);
    assert!(ok["error"].is_null());
    assert_eq!(ok["direction"], "egress");
    assert!(ok["peer"].is_null());
    assert!(ok["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(ok["time"].as_str().unwrap().ends_with('Z'));
    let refused = next();
    assert_eq!(refused["status"], 400);
    assert_eq!(refused["error"], "missing-target");
    assert_eq!(refused["service"], "none");
    drop(sidecar);
}

#[test]
fn certs_writes_a_development_ca_and_says_where() {
    let dir = temp_dir("certs");
    let mut cmd = sidecar_bin();
    cmd.args(["certs", "--out"]).arg(&dir).args([
        "--trust-domain",
        "mesh.test",
        "orders",
        "payments",
    ]);
    let out = run_to_end(cmd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("not for production"), "{stdout}");
    assert!(
        stdout.contains("spiffe://mesh.test/service/payments"),
        "{stdout}"
    );
    for file in [
        "ca.pem",
        "ca-key.pem",
        "orders.pem",
        "orders-key.pem",
        "payments.pem",
    ] {
        assert!(dir.join(file).is_file(), "{file}");
    }
    // A name that is not a service name is refused, naming it.
    let mut bad = sidecar_bin();
    bad.args(["certs", "--out"]).arg(&dir).arg("no/slashes");
    let out = run_to_end(bad);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no/slashes"));
}

/// A sidecar's stdout, line by line, as the lines arrive.
fn lines(stdout: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    rx
}

#[actix_rt::test]
async fn every_inbound_request_gets_an_access_log_line_with_the_peer_identity() {
    use support::mesh::{Pki, call_to};
    let app = RawUpstream::ok().await;
    let pki = Pki::new("access-log");
    let inbound: std::net::SocketAddr = ([127, 0, 0, 1], support::process::free_port()).into();
    let policy = pki.dir.join("policy.yaml");
    std::fs::write(
        &policy,
        pki.policy_on(app.addr, &inbound.to_string())
            + "    authorization:\n      - from: [payments]\n",
    )
    .unwrap();
    let mut cmd = sidecar_bin();
    cmd.args(["--access-log", "on"])
        .arg("--policy")
        .arg(&policy)
        .env_remove("SIDECAR_CONFIG");
    let (sidecar, stdout) = SidecarProcess::spawn_capturing_stdout(cmd);
    let rx = lines(stdout);
    // The egress listener is bound first: wait for the inbound one too.
    support::process::until_listening(inbound);

    let status = call_to(
        &pki.peer("payments"),
        inbound,
        "GET /orders/7?token=secret",
        "",
    )
    .await;
    assert_eq!(status, Ok(200));
    let status = call_to(&pki.peer("inventory"), inbound, "DELETE /orders/7", "").await;
    assert_eq!(status, Ok(403));

    let next = || -> serde_json::Value {
        let line = rx
            .recv_timeout(support::DEADLINE)
            .expect("an access log line");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    };
    let ok = next();
    assert_eq!(ok["direction"], "inbound", "{ok}");
    assert_eq!(ok["peer"], "spiffe://mesh.test/service/payments");
    assert_eq!(ok["service"], "inbound");
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["path"], "/orders/7", "the query is left out by default");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["upstream"], app.addr.to_string());
    assert_eq!(ok["attempts"], 1);
    assert_eq!(ok["bytes_out"], 2);
    assert!(ok["error"].is_null());
    let denied = next();
    assert_eq!(denied["direction"], "inbound", "{denied}");
    assert_eq!(denied["peer"], "spiffe://mesh.test/service/inventory");
    assert_eq!(denied["status"], 403);
    assert_eq!(denied["error"], "forbidden");
    assert_eq!(denied["attempts"], 0, "the app never saw it");
    drop(sidecar);
}

/// Runs the binary on a policy file until it exits (it must not start).
fn start_refused(policy: &std::path::Path) -> std::process::Output {
    let mut cmd = sidecar_bin();
    cmd.arg("--policy")
        .arg(policy)
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .env_remove("SIDECAR_CONFIG")
        .env_remove("SIDECAR_PORT");
    run_to_end(cmd)
}

#[test]
fn a_mesh_start_up_error_says_why_and_never_panics() {
    use sidecar::certs::Validity;
    use support::mesh::Pki;
    let pki = Pki::new("start-up-errors");
    let app: std::net::SocketAddr = ([127, 0, 0, 1], 9).into();

    // A certificate file that is not there.
    let (_, key) = pki.issue("orders", Validity::default());
    let missing = pki.dir.join("missing.pem");
    let file = pki.dir.join("bad-cert.yaml");
    std::fs::write(&file, pki.policy_with(app, "127.0.0.1:0", &missing, &key)).unwrap();
    let out = start_refused(&file);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("mesh.cert: cannot read") && err.contains("missing.pem"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    // The inbound port is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let file = pki.dir.join("taken.yaml");
    std::fs::write(&file, pki.policy_on(app, &addr.to_string())).unwrap();
    let out = start_refused(&file);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("mesh.inbound.listen: cannot bind {addr}")),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// `sidecar check` on `text`, written to a file of `dir`: its exit status, stderr and how long it took.
fn check_text(
    dir: &std::path::Path,
    name: &str,
    text: &str,
) -> (Option<i32>, String, std::time::Duration) {
    let file = dir.join(name);
    std::fs::write(&file, text).unwrap();
    let mut cmd = sidecar_bin();
    cmd.arg("check").arg(&file).env_remove("SIDECAR_CONFIG");
    let start = std::time::Instant::now();
    let out = run_to_end(cmd);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        start.elapsed(),
    )
}

/// Regression (issue 14 item 7): a flow sequence nested 100,000 deep kept the parser busy past 10 s, in `check`
/// and at start-up alike; the time grew with the square of the depth.
#[test]
fn a_deeply_nested_policy_is_refused_fast_with_a_clear_message() {
    const DEEP: usize = 100_000;
    let dir = temp_dir("deep");
    let cases = [
        (
            "flow-seq.yaml",
            format!("services: {}{}", "[".repeat(DEEP), "]".repeat(DEEP)),
        ),
        (
            "flow-map.yaml",
            format!("services: {}1{}", "{a: ".repeat(DEEP), "}".repeat(DEEP)),
        ),
        (
            "block-seq.yaml",
            format!("services:\n  {}x\n", "- ".repeat(DEEP)),
        ),
        (
            "block-map.yaml",
            (0..2_000)
                .map(|d| format!("{}k{d}:\n", " ".repeat(d)))
                .collect(),
        ),
    ];
    for (name, text) in &cases {
        let (code, err, took) = check_text(&dir, name, text);
        assert_eq!(code, Some(1), "{name}: {err}");
        assert!(
            err.contains("nested more than 64 levels deep; refused before parsing"),
            "{name}: {err}"
        );
        assert!(
            err.contains(&format!("{name}:")),
            "{name}: the file is named: {err}"
        );
        assert!(
            took < std::time::Duration::from_secs(1),
            "{name}: took {took:?}"
        );
    }

    // Start-up refuses it as fast, with the same message.
    let mut cmd = sidecar_bin();
    cmd.arg("--policy")
        .arg(dir.join("flow-seq.yaml"))
        .env_remove("SIDECAR_CONFIG")
        .env("SIDECAR_PORT", "0");
    let start = std::time::Instant::now();
    let out = run_to_end(cmd);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nested more than 64 levels deep"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(start.elapsed() < std::time::Duration::from_secs(1));

    // A policy nested as deep as real ones are (and deeper, in flow style) is still accepted.
    let brackets = "[".repeat(100);
    let nested = format!(
        "services:\n  orders:\n    endpoints: ['127.0.0.1:8080']\n    retries:\n      on: [reset, 503, \"500-502\"]\n      backoff: {{base: 10ms, max: 1s}}\n    # a comment with {brackets}\ndispatch:\n  key: x-client\n  destination: http://127.0.0.1:9\n  rewrites:\n    dev:\n      destination: http://127.0.0.1:9\n      patch:\n        - key: x-note\n          val: \"{brackets}\"\n        - key: x-other\n          val: don't {brackets}\n"
    );
    let (code, err, _) = check_text(&dir, "nested.yaml", &nested);
    assert_eq!(code, Some(0), "{err}");
}

/// Regression (issue 15 item 7): an empty policy file (an editor's truncate-then-write leaves one for a moment)
/// was applied as a valid empty policy, and every service was unknown.
#[test]
fn an_empty_or_comments_only_policy_file_is_refused_by_check_and_at_start_up() {
    let dir = temp_dir("empty");
    for (name, text) in [
        ("empty.yaml", ""),
        ("blank.yaml", "\n   \n"),
        ("comments.yaml", "# services:\n#   orders: {}\n---\n"),
    ] {
        let (code, err, _) = check_text(&dir, name, text);
        assert_eq!(code, Some(1), "{name}: {err}");
        assert!(
            err.contains(&format!("{name}: the policy file is empty")),
            "{name}: {err}"
        );
    }

    let mut cmd = sidecar_bin();
    cmd.arg("--policy")
        .arg(dir.join("empty.yaml"))
        .env_remove("SIDECAR_CONFIG")
        .env("SIDECAR_PORT", "0");
    let out = run_to_end(cmd);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the policy file is empty"));

    // In a directory, the empty file is refused, not skipped.
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("a.yaml"),
        "services:\n  orders:\n    endpoints: ['127.0.0.1:8080']\n",
    )
    .unwrap();
    std::fs::write(policies.join("b.yaml"), "").unwrap();
    let mut cmd = sidecar_bin();
    cmd.arg("check").arg(&policies).env_remove("SIDECAR_CONFIG");
    let out = run_to_end(cmd);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("b.yaml: the policy file is empty"), "{err}");

    // `{}` says "nothing" on purpose, and is accepted.
    let (code, err, _) = check_text(&dir, "nothing.yaml", "{}\n");
    assert_eq!(code, Some(0), "{err}");
}

/// Development certificates for `services` in `dir`, from the binary itself.
fn issue_certs(dir: &std::path::Path, services: &[&str]) -> std::process::Output {
    let mut cmd = sidecar_bin();
    cmd.args(["certs", "--trust-domain", "mesh.test", "--out"])
        .arg(dir)
        .args(services);
    run_to_end(cmd)
}

/// Regression (issue 15 item 11): `sidecar check` passed a policy whose mesh files start-up refuses, so gating a
/// deploy on `check` let a sidecar through that would not start.
#[test]
fn check_refuses_the_mesh_files_start_up_refuses() {
    let dir = temp_dir("check-mesh");
    let certs = dir.join("certs");
    assert!(issue_certs(&certs, &["orders"]).status.success());
    std::fs::write(certs.join("garbage.pem"), "not a certificate\n").unwrap();
    let mesh = |identity: &str, cert: &str, key: &str| {
        format!(
            "mesh:\n  trust_domain: mesh.test\n  identity: {identity}\n  ca: '{}'\n  cert: '{}'\n  key: '{}'\n",
            certs.join("ca.pem").display(),
            certs.join(cert).display(),
            certs.join(key).display()
        )
    };

    let (code, err, _) = check_text(
        &dir,
        "good.yaml",
        &mesh("orders", "orders.pem", "orders-key.pem"),
    );
    assert_eq!(code, Some(0), "{err}");

    for (name, text, says) in [
        (
            "other-identity.yaml",
            mesh("payments", "orders.pem", "orders-key.pem"),
            "spiffe://mesh.test/service/payments",
        ),
        (
            "missing-key.yaml",
            mesh("orders", "orders.pem", "nope-key.pem"),
            "nope-key.pem",
        ),
        (
            "garbage-cert.yaml",
            mesh("orders", "garbage.pem", "orders-key.pem"),
            "garbage.pem",
        ),
    ] {
        let (code, err, _) = check_text(&dir, name, &text);
        assert_eq!(code, Some(1), "{name}: check passed it: {err}");
        assert!(err.contains(says), "{name}: {err}");

        // Start-up refuses it too, for the same reason.
        let mut cmd = sidecar_bin();
        cmd.arg("--policy")
            .arg(dir.join(name))
            .env_remove("SIDECAR_CONFIG")
            .env("SIDECAR_PORT", "0")
            .args(["--admin", "127.0.0.1:0"]);
        let out = run_to_end(cmd);
        assert_eq!(out.status.code(), Some(1), "{name}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{name}"
        );
    }
}

/// `openssl verify` of the first certificate of `cert` against the CA file `ca`.
fn chains_to(ca: &std::path::Path, cert: &std::path::Path) -> bool {
    let out = std::process::Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(ca)
        .arg(cert)
        .output()
        .unwrap();
    out.status.success()
}

/// Regression (issue 15 item 12): a second `sidecar certs` replaced `ca.pem` and `ca-key.pem`, so every certificate
/// issued before stopped chaining, though the first run said to keep the key "to issue more".
#[test]
fn certs_run_again_issues_from_the_kept_ca_and_replaces_it_only_with_force() {
    let dir = temp_dir("certs-again");
    let out = issue_certs(&dir, &["orders"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("(not for production, new)"));
    let first = dir.join("orders-first.pem");
    std::fs::copy(dir.join("orders.pem"), &first).unwrap();
    let ca_before = std::fs::read(dir.join("ca.pem")).unwrap();

    let out = issue_certs(&dir, &["payments"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("(not for production, kept)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        std::fs::read(dir.join("ca.pem")).unwrap(),
        ca_before,
        "the CA was replaced"
    );
    let ca = dir.join("ca.pem");
    assert!(
        chains_to(&ca, &first),
        "the first certificate no longer chains"
    );
    assert!(chains_to(&ca, &dir.join("payments.pem")));

    // From an explicit CA elsewhere: nothing of the CA is written there.
    let other = dir.join("other");
    let mut cmd = sidecar_bin();
    cmd.args(["certs", "--trust-domain", "mesh.test", "--out"])
        .arg(&other)
        .arg("--ca")
        .arg(&ca)
        .arg("billing");
    let out = run_to_end(cmd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(chains_to(&ca, &other.join("billing.pem")));
    assert!(!other.join("ca.pem").exists());

    // A CA with only one of its two files is not silently replaced.
    let half = dir.join("half");
    std::fs::create_dir_all(&half).unwrap();
    std::fs::copy(&ca, half.join("ca.pem")).unwrap();
    let out = issue_certs(&half, &["orders"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(std::fs::read(half.join("ca.pem")).unwrap(), ca_before);

    // --force makes a new CA; what the old one issued stops chaining, as the help says.
    let mut cmd = sidecar_bin();
    cmd.args(["certs", "--force", "--out"])
        .arg(&dir)
        .arg("orders");
    assert!(run_to_end(cmd).status.success());
    assert_ne!(std::fs::read(&ca).unwrap(), ca_before);
    assert!(!chains_to(&ca, &first));
    assert!(chains_to(&ca, &dir.join("orders.pem")));
}

/// Regression (issue 15 item 13): `--days 365` gave certificates with 364 days left (`notBefore` a day early,
/// and the validity counted from it).
#[test]
fn certs_days_counts_from_now() {
    let dir = temp_dir("certs-days");
    let mut cmd = sidecar_bin();
    cmd.args(["certs", "--days", "365", "--out"])
        .arg(&dir)
        .arg("orders");
    assert!(run_to_end(cmd).status.success());
    let checkend = |seconds: u64| {
        std::process::Command::new("openssl")
            .args(["x509", "-noout", "-checkend", &seconds.to_string(), "-in"])
            .arg(dir.join("orders.pem"))
            .output()
            .unwrap()
            .status
            .success()
    };
    let year = 365 * 86_400;
    assert!(
        checkend(year - 3_600),
        "expires within 365 days less an hour"
    );
    assert!(!checkend(year + 3_600), "valid for more than 365 days");
}

/// Regression (issue 15 item 13): `sidecar certs --help` listed `--policy`, `--dispatch-config` and `--no-watch`,
/// which do nothing for it.
#[test]
fn certs_help_lists_only_its_own_options() {
    let mut cmd = sidecar_bin();
    cmd.args(["certs", "--help"]);
    let out = run_to_end(cmd);
    let help = String::from_utf8_lossy(&out.stdout);
    for foreign in ["--policy", "--dispatch-config", "--no-watch"] {
        assert!(!help.contains(foreign), "{foreign} in:\n{help}");
    }
    for own in ["--out", "--trust-domain", "--days", "--ca", "--force"] {
        assert!(help.contains(own), "{own} missing in:\n{help}");
    }
}

/// A listener that treats whatever arrives as an HTTP server treats garbage: it answers `400 Bad Request` (when
/// `answers`) and closes.
async fn plain_http_server(answers: bool) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                if stream.read(&mut buf).await.unwrap_or(0) > 0 && answers {
                    let _ = stream
                        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                }
            });
        }
    });
    addr
}

/// Regression (issue 15 item 13): a mesh endpoint that does not speak TLS (a plain HTTP server, a wrong port)
/// was reported as `upstream-reset` when it closed on the ClientHello ("tls handshake eof"), while the docs
/// promise `upstream-tls-error` for a failed handshake.
#[actix_rt::test]
async fn a_mesh_endpoint_that_does_not_speak_tls_is_a_tls_error() {
    let dir = temp_dir("not-tls");
    assert!(issue_certs(&dir, &["payments"]).status.success());
    let (answers, closes) = (
        plain_http_server(true).await,
        plain_http_server(false).await,
    );
    let policy = format!(
        "mesh:\n  trust_domain: mesh.test\n  identity: payments\n  ca: '{}'\n  cert: '{}'\n  key: '{}'\nservices:\n  answers:\n    mesh: true\n    endpoints: ['{answers}']\n    retries:\n      max_retries: 0\n  closes:\n    mesh: true\n    endpoints: ['{closes}']\n    retries:\n      max_retries: 0\n",
        dir.join("ca.pem").display(),
        dir.join("payments.pem").display(),
        dir.join("payments-key.pem").display()
    );
    let sidecar = support::Sidecar::start(&policy);
    for service in ["answers", "closes"] {
        let reply = get(
            sidecar.addr,
            "/",
            &[("target", service), ("internal", "true")],
        )
        .await;
        assert_eq!(reply.status, 502, "{service}: {}", reply.text());
        assert_eq!(
            reply.header("x-sidecar-error"),
            Some("upstream-tls-error"),
            "{service}: {}",
            reply.text()
        );
    }
    sidecar.stop().await;
}

/// Documentation check (issue 15 item 13): the inbound listener serves HTTP/2 to a client that offers `h2` by ALPN
/// (actix-http adds it), and HTTP/1.1 to one that offers only `http/1.1`, as docs/mesh.md says.
#[actix_rt::test]
async fn the_inbound_listener_speaks_h2_or_http1_by_alpn() {
    let dir = temp_dir("alpn");
    assert!(issue_certs(&dir, &["orders", "payments"]).status.success());
    let app = RawUpstream::ok().await;
    let policy = format!(
        "mesh:\n  trust_domain: mesh.test\n  identity: orders\n  ca: '{}'\n  cert: '{}'\n  key: '{}'\n  inbound:\n    listen: 127.0.0.1:0\n    app: '{}'\n",
        dir.join("ca.pem").display(),
        dir.join("orders.pem").display(),
        dir.join("orders-key.pem").display(),
        app.addr
    );
    let sidecar = support::Sidecar::start(&policy);
    let inbound = sidecar.inbound.expect("an inbound listener");
    let curl = |version: &'static str| {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new("curl")
                .args([
                    "-s",
                    "-m",
                    "10",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code} %{http_version}",
                    version,
                ])
                .arg("--cacert")
                .arg(dir.join("ca.pem"))
                .arg("--cert")
                .arg(dir.join("payments.pem"))
                .arg("--key")
                .arg(dir.join("payments-key.pem"))
                .arg(format!("https://127.0.0.1:{}/", inbound.port()))
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    assert_eq!(curl("--http2").await.unwrap(), "200 2");
    assert_eq!(curl("--http1.1").await.unwrap(), "200 1.1");
    sidecar.stop().await;
}

#[actix_rt::test]
async fn shadow_copies_and_fan_out_tallies_show_in_the_access_log() {
    let primary =
        RawUpstream::start(|_| support::response(200, &[("content-length", "2")], b"ok")).await;
    let copy =
        RawUpstream::start(|_| support::response(200, &[("content-length", "0")], b"")).await;
    let dir = temp_dir("log-copies");
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "access_log: {{}}\negress:\n  shadow:\n    '{p}':\n      - to: '{c}'\nfanout:\n  g:\n    mode: all\n    targets:\n      - to: '{p}'\n",
            p = primary.url(""),
            c = copy.url(""),
        ),
    )
    .unwrap();
    let mut cmd = sidecar_bin();
    cmd.arg("--policy")
        .arg(&policy)
        .env_remove("SIDECAR_CONFIG")
        .current_dir(std::env::temp_dir());
    let (sidecar, stdout) = SidecarProcess::spawn_capturing_stdout(cmd);
    let rx = lines(stdout);
    let next = || -> serde_json::Value {
        let line = rx
            .recv_timeout(support::DEADLINE)
            .expect("an access log line");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    };

    let target = primary.url("");
    assert_eq!(
        get(sidecar.addr, "/a", &[("target", &target)]).await.status,
        200
    );
    let shadowed = next();
    assert_eq!(shadowed["copies"], 1, "{shadowed}");
    assert!(shadowed["fanout"].is_null());

    assert_eq!(
        get(sidecar.addr, "/b", &[("fanout", "g")]).await.status,
        200
    );
    let fanned = next();
    assert_eq!(fanned["service"], "fanout:g");
    assert_eq!(fanned["fanout"], "ok=1,failed=0,timeout=0", "{fanned}");
    assert_eq!(fanned["copies"], 0);
    drop(sidecar);
    let _ = std::fs::remove_dir_all(&dir);
}
