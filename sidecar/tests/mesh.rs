//! The mesh hop, inbound: peer sidecars call over mTLS, the app behind receives the verified identity. Real
//! TLS on loopback, certificates from `sidecar certs`' own code.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly on purpose"
)]

mod support;

use std::net::SocketAddr;
use std::path::Path;

use rustls::pki_types::ServerName;
use sidecar::certs::{Ca, Validity};
use support::mesh::{DOMAIN, Peer, Pki, call, call_to, connector};
use support::{RawUpstream, Sidecar};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[actix_rt::test]
async fn a_peer_with_a_mesh_certificate_reaches_the_app_with_its_identity() {
    let pki = Pki::new("valid");
    let app = RawUpstream::ok().await;
    let sidecar = Sidecar::start(&pki.policy(app.addr));
    let inbound = sidecar.inbound.expect("an inbound listener");
    let (cert, key) = pki.issue("payments", Validity::default());
    let tls = connector(&pki.dir.join("ca.pem"), Some((&cert, &key)));

    // A forged identity header from the caller is replaced by the verified one.
    let status = call(
        &tls,
        inbound,
        "x-sidecar-peer-identity: spiffe://mesh.test/service/admin\r\n",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let seen = app.wait_for(1).await;
    assert_eq!(
        seen[0].all("x-sidecar-peer-identity"),
        ["spiffe://mesh.test/service/payments"]
    );
    assert_eq!(seen[0].target, "/hello");
    sidecar.stop().await;
}

#[actix_rt::test]
async fn peers_without_a_valid_mesh_certificate_are_refused() {
    let pki = Pki::new("invalid");
    let app = RawUpstream::ok().await;
    let sidecar = Sidecar::start(&pki.policy(app.addr));
    let inbound = sidecar.inbound.expect("an inbound listener");
    let ca = pki.dir.join("ca.pem");

    // No client certificate.
    assert!(call(&connector(&ca, None), inbound, "").await.is_err());

    // A certificate from another CA.
    let other = Pki::new("other-ca");
    let (cert, key) = other.issue("payments", Validity::default());
    assert!(
        call(&connector(&ca, Some((&cert, &key))), inbound, "")
            .await
            .is_err()
    );

    // An expired certificate from the right CA.
    let (cert, key) = pki.issue(
        "expired",
        Validity {
            start_days: -30,
            days: 10,
        },
    );
    assert!(
        call(&connector(&ca, Some((&cert, &key))), inbound, "")
            .await
            .is_err()
    );

    assert!(app.received().is_empty(), "nothing reached the app");
    sidecar.stop().await;
}

#[actix_rt::test]
async fn curl_with_a_mesh_certificate_is_a_peer_too() {
    let pki = Pki::new("curl");
    let app = RawUpstream::ok().await;
    let sidecar = Sidecar::start(&pki.policy(app.addr));
    let inbound = sidecar.inbound.expect("an inbound listener");
    let (cert, key) = pki.issue("payments", Validity::default());
    let ca = pki.dir.join("ca.pem");
    let url = format!("https://127.0.0.1:{}/hello", inbound.port());
    let curl = |with_cert: bool| {
        let (url, ca, cert, key) = (url.clone(), ca.clone(), cert.clone(), key.clone());
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new("curl");
            cmd.args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "10",
            ])
            .arg("--cacert")
            .arg(&ca);
            if with_cert {
                cmd.arg("--cert").arg(&cert).arg("--key").arg(&key);
            }
            let out = cmd
                .arg(&url)
                .output()
                .expect("curl (Debian's curl package)");
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    assert_eq!(curl(true).await.unwrap(), "200");
    // Without a client certificate curl gets no HTTP answer at all.
    assert_eq!(curl(false).await.unwrap(), "000");
    assert_eq!(
        app.wait_for(1).await[0].header("x-sidecar-peer-identity"),
        Some("spiffe://mesh.test/service/payments")
    );
    sidecar.stop().await;
}

impl Pki {
    /// A sidecar's `mesh` section for `identity`, without an inbound listener.
    fn outbound_policy(&self, identity: &str, services: &str) -> String {
        let (cert, key) = self.issue(identity, Validity::default());
        format!(
            "mesh:\n  trust_domain: {DOMAIN}\n  identity: {identity}\n  ca: '{}'\n  cert: '{}'\n  key: '{}'\nservices:\n{services}",
            self.dir.join("ca.pem").display(),
            cert.display(),
            key.display()
        )
    }
}

#[actix_rt::test]
async fn an_app_calls_a_peer_service_through_both_sidecars_over_mtls() {
    let pki = Pki::new("hop");
    let app = RawUpstream::ok().await;
    // The orders side: its sidecar's inbound listener in front of its app.
    let orders = Sidecar::start(&pki.policy(app.addr));
    let inbound = orders.inbound.expect("an inbound listener");
    // The payments side: its app calls `orders` through its own sidecar.
    let payments = Sidecar::start(&pki.outbound_policy(
        "payments",
        &format!(
            "  orders:\n    mesh: true\n    endpoints: ['{inbound}']\n  impostor:\n    mesh: true\n    endpoints: ['{inbound}']\n    retries:\n      max_retries: 0\n"
        ),
    ));
    for _ in 0..3 {
        let reply = support::get(
            payments.addr,
            "/pay",
            &[("target", "orders"), ("internal", "true")],
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let seen = app.wait_for(3).await;
    assert!(
        seen.iter()
            .all(|r| r.header("x-sidecar-peer-identity")
                == Some("spiffe://mesh.test/service/payments")),
        "the app sees who called"
    );

    // A service whose endpoint presents another identity is refused before any byte is sent.
    let reply = support::get(
        payments.addr,
        "/pay",
        &[("target", "impostor"), ("internal", "true")],
    )
    .await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.header("x-sidecar-error"), Some("upstream-tls-error"));
    assert!(
        reply
            .text()
            .contains("not spiffe://mesh.test/service/impostor"),
        "{}",
        reply.text()
    );
    assert_eq!(app.received().len(), 3);
    payments.stop().await;
    orders.stop().await;
}

/// Found by running the compose deployment: endpoints that discovery found for a `mesh: true` service were
/// called in plain HTTP, so the peer's TLS listener answered garbage (502 `upstream-protocol-error`).
#[actix_rt::test]
async fn a_mesh_service_found_by_discovery_is_called_over_mtls() {
    let pki = Pki::new("discovered");
    let app = RawUpstream::ok().await;
    let orders = Sidecar::start(&pki.policy(app.addr));
    let inbound = orders.inbound.expect("an inbound listener");
    let hosts = pki.dir.join("orders-hosts.json");
    std::fs::write(&hosts, format!("[\"{inbound}\"]")).unwrap();
    let payments = Sidecar::start(&pki.outbound_policy(
        "payments",
        &format!(
            "  orders:\n    mesh: true\n    discovery:\n      hosts_file: '{}'\n",
            hosts.display()
        ),
    ));
    let called = || async {
        support::get(
            payments.addr,
            "/pay",
            &[("target", "orders"), ("internal", "true")],
        )
        .await
    };
    support::eventually("the discovered peer answers over mTLS", || async {
        called().await.status == 200
    })
    .await;
    let seen = app.wait_for(1).await;
    assert_eq!(
        seen[0].header("x-sidecar-peer-identity"),
        Some("spiffe://mesh.test/service/payments")
    );
    payments.stop().await;
    orders.stop().await;
}

#[actix_rt::test]
async fn authorization_allows_what_is_written_and_denies_the_rest() {
    let pki = Pki::new("authz");
    let app = RawUpstream::ok().await;
    let policy = pki.policy(app.addr)
        + "    authorization:\n      - from: [payments]\n        methods: [GET]\n        paths: ['/orders/*']\n      - from: ['spiffe://mesh.test/service/admin']\n";
    let sidecar = Sidecar::start(&policy);
    let inbound = sidecar.inbound.expect("an inbound listener");
    let ca = pki.dir.join("ca.pem");
    let as_peer = |name: &str| {
        let (cert, key) = pki.issue(name, Validity::default());
        connector(&ca, Some((&cert, &key)))
    };
    let (payments, inventory, admin) =
        (as_peer("payments"), as_peer("inventory"), as_peer("admin"));
    assert_eq!(
        call_to(&payments, inbound, "GET /orders/7", "").await,
        Ok(200)
    );
    assert_eq!(
        call_to(&payments, inbound, "POST /orders/7", "").await,
        Ok(403)
    );
    assert_eq!(call_to(&payments, inbound, "GET /admin", "").await, Ok(403));
    assert_eq!(
        call_to(&inventory, inbound, "GET /orders/7", "").await,
        Ok(403)
    );
    assert_eq!(
        call_to(&admin, inbound, "DELETE /anything", "").await,
        Ok(200)
    );
    assert_eq!(
        app.received().len(),
        2,
        "denied requests never reach the app"
    );
    sidecar.stop().await;
}

/// Writes `contents` to `path` the way operators and cert-manager do: a new file renamed over the old one.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The sidecar's `/admin/mesh` state.
async fn mesh_state(sidecar: &Sidecar) -> serde_json::Value {
    let reply = support::get(sidecar.admin, "/admin/mesh", &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

/// Polls `/admin/mesh` until `ready` holds of it (the files are re-read every second).
async fn until_mesh(sidecar: &Sidecar, what: &str, ready: impl Fn(&serde_json::Value) -> bool) {
    support::eventually(what, || async { ready(&mesh_state(sidecar).await) }).await;
}

/// The serial of the certificate a new TLS connection to `addr` is shown (a resumed session shows the one of
/// the session it resumes).
async fn served_serial(tls: &TlsConnector, addr: SocketAddr) -> String {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let stream = tls
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .unwrap();
    let der = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    cert.raw_serial_as_string()
}

fn serial(state: &serde_json::Value) -> String {
    state["certificate"]["serial"].as_str().unwrap().to_string()
}

#[actix_rt::test]
async fn certificates_and_the_ca_rotate_during_traffic_with_no_failed_request() {
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;

    let pki = Pki::new("rotate");
    let app = RawUpstream::ok().await;
    let orders = Sidecar::start(&pki.policy(app.addr));
    let inbound = orders.inbound.expect("an inbound listener");
    let payments = Sidecar::start(&pki.outbound_policy(
        "payments",
        &format!("  orders:\n    mesh: true\n    endpoints: ['{inbound}']\n"),
    ));
    let ca_path = pki.dir.join("ca.pem");
    let old_serial = serial(&mesh_state(&orders).await);

    // Traffic the whole time: the app's calls through both sidecars, and a new direct mTLS connection to the
    // orders sidecar each time (a new handshake, so it meets whatever certificate is current).
    let (stop, done, failures) = (
        Rc::new(Cell::new(false)),
        Rc::new(Cell::new(0usize)),
        Rc::new(RefCell::new(Vec::<String>::new())),
    );
    let traffic = {
        let (stop, done, failures) = (stop.clone(), done.clone(), failures.clone());
        let (payments_addr, ca_path) = (payments.addr, ca_path.clone());
        let (peer_cert, peer_key) = pki.issue("inventory", Validity::default());
        actix_rt::spawn(async move {
            while !stop.get() {
                let reply = support::get(
                    payments_addr,
                    "/pay",
                    &[("target", "orders"), ("internal", "true")],
                )
                .await;
                if reply.status != 200 {
                    failures
                        .borrow_mut()
                        .push(format!("via the sidecars: {}", reply.text()));
                }
                let direct = connector(&ca_path, Some((&peer_cert, &peer_key)));
                match call(&direct, inbound, "").await {
                    Ok(200) => {}
                    other => failures.borrow_mut().push(format!("direct: {other:?}")),
                }
                done.set(done.get() + 1);
            }
        })
    };
    let until_done = |n: usize| {
        let done = done.clone();
        async move {
            support::eventually(&format!("{n} rounds of traffic"), || async {
                done.get() >= n
            })
            .await;
        }
    };
    until_done(20).await;

    // 1. The new CA joins the bundle everywhere.
    let new_ca = Ca::generate(DOMAIN, Validity::default()).unwrap();
    replace(&ca_path, &format!("{}{}", pki.ca.cert_pem, new_ca.cert_pem));
    for sidecar in [&orders, &payments] {
        until_mesh(sidecar, "the new CA trusted", |s| {
            s["ca"].as_array().unwrap().len() == 2
        })
        .await;
    }

    // 2. Each sidecar gets a certificate from the new CA: key first, then certificate, so for a moment the
    //    two do not match and the old pair keeps serving.
    let rotate = |service: &str| {
        let (chain, key) = new_ca.issue(DOMAIN, service, Validity::default()).unwrap();
        replace(&pki.dir.join(format!("{service}-key.pem")), &key);
        replace(&pki.dir.join(format!("{service}.pem")), &chain);
    };
    rotate("orders");
    until_mesh(&orders, "the new orders certificate in use", |s| {
        serial(s) != old_serial
    })
    .await;
    rotate("payments");
    until_mesh(&payments, "the new payments certificate in use", |s| {
        s["reloads"]["applied"].as_u64() == Some(2)
    })
    .await;
    let now = done.get();
    until_done(now + 20).await;

    // New connections from the payments sidecar now present its new certificate and verify the new one of
    // orders: a burst opens more than the pool holds.
    let burst = (0..8).map(|_| {
        support::get(
            payments.addr,
            "/pay",
            &[("target", "orders"), ("internal", "true")],
        )
    });
    for reply in futures_util::future::join_all(burst).await {
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    stop.set(true);
    traffic.await.unwrap();

    let failures = failures.take();
    assert!(
        failures.is_empty(),
        "{} of {} rounds failed: {:?}",
        failures.len(),
        done.get(),
        &failures[..failures.len().min(5)]
    );
    let fresh = connector(
        &ca_path,
        Some((
            &pki.dir.join("payments.pem"),
            &pki.dir.join("payments-key.pem"),
        )),
    );
    assert_eq!(
        served_serial(&fresh, inbound).await,
        serial(&mesh_state(&orders).await),
        "a new connection is shown the new certificate"
    );
    payments.stop().await;
    orders.stop().await;
}

#[actix_rt::test]
async fn a_half_written_certificate_keeps_the_old_one_serving() {
    let pki = Pki::new("half");
    let app = RawUpstream::ok().await;
    let orders = Sidecar::start(&pki.policy(app.addr));
    let inbound = orders.inbound.expect("an inbound listener");
    let (cert, key) = pki.issue("payments", Validity::default());
    let tls = connector(&pki.dir.join("ca.pem"), Some((&cert, &key)));
    let state = mesh_state(&orders).await;
    let old_serial = serial(&state);
    let year = 365 * 86_400;
    let expires = state["expires_in_seconds"].as_i64().unwrap();
    assert!((year - 2 * 86_400..=year).contains(&expires), "{state}");

    // A new key in place, and its certificate only half written.
    let (chain, new_key) = pki.ca.issue(DOMAIN, "orders", Validity::default()).unwrap();
    let (cert_path, key_path) = (pki.dir.join("orders.pem"), pki.dir.join("orders-key.pem"));
    replace(&key_path, &new_key);
    std::fs::write(&cert_path, &chain[..chain.len() / 2]).unwrap();
    until_mesh(&orders, "the half-written file noticed", |s| {
        s["reloads"]["pending_error"]
            .as_str()
            .is_some_and(|e| e.contains("mesh.cert"))
    })
    .await;
    assert_eq!(serial(&mesh_state(&orders).await), old_serial);
    assert_eq!(call(&tls, inbound, "").await, Ok(200));
    assert_eq!(served_serial(&tls, inbound).await, old_serial);

    // The rest of the file arrives: the new pair is used.
    std::fs::write(&cert_path, &chain).unwrap();
    until_mesh(&orders, "the completed file used", |s| {
        serial(s) != old_serial && s["reloads"]["pending_error"].is_null()
    })
    .await;
    assert_eq!(call(&tls, inbound, "").await, Ok(200));
    // A new client: one that resumes an earlier TLS session is not shown a certificate again.
    let fresh = connector(&pki.dir.join("ca.pem"), Some((&cert, &key)));
    assert_ne!(served_serial(&fresh, inbound).await, old_serial);

    // Expiry and reloads are metrics too.
    let metrics = support::get(orders.admin, "/metrics", &[]).await.text();
    let line = |prefix: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{metrics}"))
            .to_string()
    };
    let expiry: f64 = line("sidecar_mesh_certificate_expiry_seconds{certificate=\"identity\"}")
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(expiry > (year - 2 * 86_400) as f64 && expiry <= year as f64);
    line("sidecar_mesh_certificate_reloads_total{result=\"rejected\"}");
    line("sidecar_mesh_certificate_reloads_total{result=\"applied\"}");
    orders.stop().await;
}

#[actix_rt::test]
async fn openssl_s_client_with_a_mesh_certificate_is_a_peer_and_without_one_is_not() {
    let pki = Pki::new("openssl");
    let app = RawUpstream::ok().await;
    let sidecar = Sidecar::start(&pki.policy(app.addr));
    let inbound = sidecar.inbound.expect("an inbound listener");
    let (cert, key) = pki.issue("payments", Validity::default());
    let ca = pki.dir.join("ca.pem");
    let s_client = |extra: Vec<String>| {
        let (ca, connect) = (ca.clone(), format!("127.0.0.1:{}", inbound.port()));
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut child = std::process::Command::new("timeout")
                .args([
                    "10",
                    "openssl",
                    "s_client",
                    "-quiet",
                    "-verify_return_error",
                ])
                .arg("-connect")
                .arg(&connect)
                .arg("-CAfile")
                .arg(&ca)
                .args(&extra)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("openssl (Debian's openssl package)");
            child
                .stdin
                .take()
                .unwrap()
                .write_all(
                    b"GET /from-openssl HTTP/1.1\r\nhost: orders\r\nconnection: close\r\n\r\n",
                )
                .unwrap();
            let out = child.wait_with_output().unwrap();
            (
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
    };
    let with_cert = vec![
        "-cert".to_string(),
        cert.display().to_string(),
        "-key".to_string(),
        key.display().to_string(),
    ];
    let (out, err) = s_client(with_cert.clone()).await.unwrap();
    assert!(
        out.starts_with("HTTP/1.1 200"),
        "stdout: {out}\nstderr: {err}"
    );
    assert_eq!(
        app.wait_for(1).await[0].header("x-sidecar-peer-identity"),
        Some("spiffe://mesh.test/service/payments")
    );

    // No client certificate: the server's alert, no HTTP.
    let (out, err) = s_client(Vec::new()).await.unwrap();
    assert!(!out.contains("HTTP/1.1"), "stdout: {out}");
    assert!(err.contains("alert"), "stderr: {err}");

    // TLS 1.2 is refused unless the policy allows it.
    let mut tls12 = with_cert;
    tls12.push("-tls1_2".to_string());
    let (out, err) = s_client(tls12).await.unwrap();
    assert!(!out.contains("HTTP/1.1"), "stdout: {out}\nstderr: {err}");
    assert_eq!(app.received().len(), 1, "only the peer reached the app");
    sidecar.stop().await;
}

#[actix_rt::test]
async fn inbound_rate_limits_count_per_peer_identity() {
    let pki = Pki::new("rate");
    let app = RawUpstream::ok().await;
    let sidecar = Sidecar::start(
        &(pki.policy(app.addr) + "    rate_limit:\n      rate: 1/m\n      burst: 2\n"),
    );
    let inbound = sidecar.inbound.expect("an inbound listener");
    let ca = pki.dir.join("ca.pem");
    let as_peer = |name: &str| {
        let (cert, key) = pki.issue(name, Validity::default());
        connector(&ca, Some((&cert, &key)))
    };
    let (payments, inventory) = (as_peer("payments"), as_peer("inventory"));
    for _ in 0..2 {
        assert_eq!(call(&payments, inbound, "").await, Ok(200));
    }
    assert_eq!(
        call(&payments, inbound, "").await,
        Ok(429),
        "payments spent its burst"
    );
    assert_eq!(
        call(&inventory, inbound, "").await,
        Ok(200),
        "inventory has its own bucket"
    );
    assert_eq!(app.received().len(), 3);
    sidecar.stop().await;
}

#[actix_rt::test]
async fn an_inbound_concurrency_limit_protects_the_app() {
    let pki = Pki::new("concurrency");
    let (held, arrived, release) = support::held_upstream().await;
    let sidecar = Sidecar::start(
        &(pki.policy(held) + "    concurrency:\n      max_in_flight: 1\n      queue: 0\n"),
    );
    let inbound = sidecar.inbound.expect("an inbound listener");
    let (cert, key) = pki.issue("payments", Validity::default());
    let tls = connector(&pki.dir.join("ca.pem"), Some((&cert, &key)));

    // The app holds the first request; with no queue, a second one is refused at once.
    let first = actix_rt::spawn({
        let tls = tls.clone();
        async move { call(&tls, inbound, "").await }
    });
    arrived.notified().await;
    assert_eq!(call(&tls, inbound, "").await, Ok(503));
    release.notify_one();
    assert_eq!(first.await.unwrap(), Ok(200));
    sidecar.stop().await;
}

/// `POST /admin/reload`: the status and the report.
async fn reload(sidecar: &Sidecar) -> (u16, serde_json::Value) {
    let reply = support::request(
        sidecar.admin,
        "POST /admin/reload HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    (reply.status, reply.json())
}

/// The orders sidecar on a policy file in the PKI's directory, reloaded by `POST /admin/reload`.
fn policy_file(pki: &Pki, text: &str) -> std::path::PathBuf {
    let file = pki.dir.join("policy.yaml");
    std::fs::write(&file, text).unwrap();
    file
}

#[actix_rt::test]
async fn a_moved_inbound_listener_serves_mtls_on_the_new_port_and_the_old_port_refuses() {
    let pki = Pki::new("move");
    let app = RawUpstream::ok().await;
    let (cert, key) = pki.issue("orders", Validity::default());
    let file = policy_file(&pki, &pki.policy_with(app.addr, "127.0.0.1:0", &cert, &key));
    let sidecar = Sidecar::start_path(&file);
    let old = sidecar.inbound.expect("an inbound listener");
    let payments = pki.peer("payments");
    assert_eq!(call(&payments, old, "").await, Ok(200));

    let new: SocketAddr = ([127, 0, 0, 1], support::process::free_port()).into();
    replace(
        &file,
        &pki.policy_with(app.addr, &new.to_string(), &cert, &key),
    );
    let (status, report) = reload(&sidecar).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["result"], "applied", "{report}");
    assert_eq!(
        report["restart_required"],
        serde_json::json!([]),
        "{report}"
    );
    assert_eq!(
        report["listener_changes"],
        serde_json::json!([format!(
            "mesh inbound listener restarted on {new}; the previous one drains"
        )]),
        "{report}"
    );

    // The new port serves peers over mTLS, and only them.
    assert_eq!(call(&payments, new, "").await, Ok(200));
    let ca = pki.dir.join("ca.pem");
    assert!(call(&connector(&ca, None), new, "").await.is_err());
    // The old port refuses connections once its server has stopped accepting.
    support::eventually("the old inbound port refuses connections", || async {
        TcpStream::connect(old).await.is_err()
    })
    .await;
    assert_eq!(app.received().len(), 2);
    sidecar.stop().await;
}

#[actix_rt::test]
async fn an_authorization_rule_changed_on_reload_applies_to_the_next_request_on_a_kept_connection()
{
    let pki = Pki::new("authz-reload");
    let app = RawUpstream::ok().await;
    let (cert, key) = pki.issue("orders", Validity::default());
    let base = pki.policy_with(app.addr, "127.0.0.1:0", &cert, &key);
    let rules = |methods: &str| {
        format!(
            "{base}    authorization:\n      - from: [payments]\n        methods: [{methods}]\n        paths: ['/orders/*']\n"
        )
    };
    let file = policy_file(&pki, &rules("GET"));
    let sidecar = Sidecar::start_path(&file);
    let inbound = sidecar.inbound.expect("an inbound listener");
    // One connection for the whole story: the rules change under it, the listener does not.
    let mut payments = Peer::connect(&pki.peer("payments"), inbound).await;
    assert_eq!(payments.send("GET /orders/7").await, 200);
    assert_eq!(payments.send("POST /orders/7").await, 403);

    replace(&file, &rules("GET, POST"));
    let (status, report) = reload(&sidecar).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        report["restart_required"],
        serde_json::json!([]),
        "{report}"
    );
    assert_eq!(
        report["listener_changes"],
        serde_json::json!(["mesh inbound authorization applied to the next requests"]),
        "{report}"
    );
    assert_eq!(payments.send("POST /orders/7").await, 200);
    assert_eq!(payments.send("DELETE /orders/7").await, 403);
    assert_eq!(
        app.received().len(),
        2,
        "denied requests never reach the app"
    );
    sidecar.stop().await;
}

#[actix_rt::test]
async fn a_reload_naming_an_unusable_certificate_is_rejected_and_the_old_one_keeps_serving() {
    let pki = Pki::new("bad-cert-reload");
    let app = RawUpstream::ok().await;
    let (cert, key) = pki.issue("orders", Validity::default());
    let file = policy_file(&pki, &pki.policy_with(app.addr, "127.0.0.1:0", &cert, &key));
    let sidecar = Sidecar::start_path(&file);
    let inbound = sidecar.inbound.expect("an inbound listener");
    let payments = pki.peer("payments");
    let ca = pki.dir.join("ca.pem");
    let (peer_cert, peer_key) = (
        pki.dir.join("payments.pem"),
        pki.dir.join("payments-key.pem"),
    );
    let fresh = || connector(&ca, Some((&peer_cert, &peer_key)));
    let old_serial = serial(&mesh_state(&sidecar).await);

    // A certificate path that does not exist: the reload is refused as an invalid file would be.
    let missing = pki.dir.join("no-such-orders.pem");
    replace(
        &file,
        &pki.policy_with(app.addr, "127.0.0.1:0", &missing, &key),
    );
    let (status, report) = reload(&sidecar).await;
    assert_eq!(status, 422, "{report}");
    assert_eq!(report["result"], "rejected", "{report}");
    let error = report["errors"][0].as_str().unwrap();
    assert!(
        error.contains("mesh.cert: cannot read") && error.contains("no-such-orders.pem"),
        "{report}"
    );
    assert_eq!(call(&payments, inbound, "").await, Ok(200));
    assert_eq!(served_serial(&fresh(), inbound).await, old_serial);
    let state = mesh_state(&sidecar).await;
    assert_eq!(state["files"]["cert"], cert.display().to_string());

    // Another certificate of this identity under a new name: used by the next handshake, same listener.
    let (chain, new_key) = pki.ca.issue(DOMAIN, "orders", Validity::default()).unwrap();
    let (cert2, key2) = (
        pki.dir.join("orders-2.pem"),
        pki.dir.join("orders-2-key.pem"),
    );
    std::fs::write(&cert2, chain).unwrap();
    std::fs::write(&key2, new_key).unwrap();
    replace(
        &file,
        &pki.policy_with(app.addr, "127.0.0.1:0", &cert2, &key2),
    );
    let (status, report) = reload(&sidecar).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        report["restart_required"],
        serde_json::json!([]),
        "{report}"
    );
    assert!(
        report["listener_changes"][0]
            .as_str()
            .unwrap()
            .starts_with("mesh identity spiffe://mesh.test/service/orders now read from"),
        "{report}"
    );
    let state = mesh_state(&sidecar).await;
    assert_eq!(state["files"]["cert"], cert2.display().to_string());
    assert_ne!(serial(&state), old_serial);
    assert_eq!(served_serial(&fresh(), inbound).await, serial(&state));
    assert_eq!(call(&payments, inbound, "").await, Ok(200));
    sidecar.stop().await;
}

#[actix_rt::test]
async fn an_inbound_address_already_taken_is_reported_and_the_old_listener_stays_until_a_later_reload()
 {
    let pki = Pki::new("inbound-taken");
    let app = RawUpstream::ok().await;
    let (cert, key) = pki.issue("orders", Validity::default());
    let file = policy_file(&pki, &pki.policy_with(app.addr, "127.0.0.1:0", &cert, &key));
    let sidecar = Sidecar::start_path(&file);
    let inbound = sidecar.inbound.expect("an inbound listener");
    let payments = pki.peer("payments");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let moved = pki.policy_with(app.addr, &addr.to_string(), &cert, &key);
    replace(&file, &moved);
    let (status, report) = reload(&sidecar).await;
    assert_eq!(status, 200, "{report}");
    assert!(
        report["restart_required"][0]
            .as_str()
            .unwrap()
            .starts_with(&format!("mesh.inbound.listen: cannot move to {addr}: ")),
        "{report}"
    );
    assert_eq!(call(&payments, inbound, "").await, Ok(200));

    // The address is free now: the next reload that changes the file moves the listener.
    drop(taken);
    replace(&file, &format!("{moved}# again\n"));
    let (status, report) = reload(&sidecar).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        report["listener_changes"],
        serde_json::json!([format!(
            "mesh inbound listener restarted on {addr}; the previous one drains"
        )]),
        "{report}"
    );
    assert_eq!(call(&payments, addr, "").await, Ok(200));
    sidecar.stop().await;
}

/// Issue 14 item 1 (the class of Envoy's CVE-2019-9901): a peer allowed only `/public/*` got 200 for
/// `/public/../private` and its spellings, and the app received the path unchanged. The path is normalized
/// before authorization, and the app receives the normalized path.
#[actix_rt::test]
async fn dot_segments_cannot_climb_out_of_an_allowed_prefix() {
    let pki = Pki::new("dots");
    let app = RawUpstream::ok().await;
    let policy = pki.policy(app.addr)
        + "    authorization:\n      - from: [payments]\n        methods: [GET]\n        paths: ['/public/*']\n";
    let sidecar = Sidecar::start(&policy);
    let inbound = sidecar.inbound.expect("an inbound listener");
    let (cert, key) = pki.issue("payments", Validity::default());
    let payments = connector(&pki.dir.join("ca.pem"), Some((&cert, &key)));

    for bypass in [
        "/public/../private",
        "/public/%2e%2e/private",
        "/public/%2E%2E/private",
        "/public/.%2e/private",
        "/public/./../private",
    ] {
        assert_eq!(
            call_to(&payments, inbound, &format!("GET {bypass}"), "").await,
            Ok(403),
            "{bypass} is authorized as /private"
        );
    }
    for refused in [
        "/public/../../etc/passwd",
        "/public/a%2fb",
        "/public/a%5Cb",
        "/public/%zz",
    ] {
        assert_eq!(
            call_to(&payments, inbound, &format!("GET {refused}"), "").await,
            Ok(400),
            "{refused} cannot be normalized"
        );
    }
    assert!(app.received().is_empty(), "nothing reached the app");

    // Allowed once normalized, and the app receives the normalized path with the query untouched.
    for (sent, seen) in [
        ("/public/a/../b?q=/../x", "/public/b?q=/../x"),
        ("/public/%2e%2e/public/./x", "/public/x"),
        ("/public/%7euser", "/public/~user"),
        ("/public//x", "/public//x"),
    ] {
        assert_eq!(
            call_to(&payments, inbound, &format!("GET {sent}"), "").await,
            Ok(200),
            "{sent}"
        );
        let received = app.received();
        assert_eq!(received.last().unwrap().target, seen, "{sent}");
    }
    sidecar.stop().await;
}

/// `mesh.inbound.paths`: slashes merged (Envoy's `merge_slashes`) and encoded slashes passed on unchanged when
/// the operator allows them.
#[actix_rt::test]
async fn path_options_merge_slashes_and_allow_encoded_slashes() {
    let pki = Pki::new("path-options");
    let app = RawUpstream::ok().await;
    let policy = pki.policy(app.addr)
        + "    paths:\n      merge_slashes: true\n      encoded_slashes: allow\n    authorization:\n      - from: [payments]\n        paths: ['/public/*']\n";
    let sidecar = Sidecar::start(&policy);
    let inbound = sidecar.inbound.expect("an inbound listener");
    let (cert, key) = pki.issue("payments", Validity::default());
    let payments = connector(&pki.dir.join("ca.pem"), Some((&cert, &key)));
    assert_eq!(
        call_to(&payments, inbound, "GET //public//x", "").await,
        Ok(200)
    );
    assert_eq!(
        call_to(&payments, inbound, "GET /public/a%2Fb", "").await,
        Ok(200)
    );
    let targets: Vec<String> = app
        .wait_for(2)
        .await
        .into_iter()
        .map(|r| r.target)
        .collect();
    assert_eq!(targets, ["/public/x", "/public/a%2Fb"]);
    sidecar.stop().await;
}

/// Issue 14 item 2: an app's `x_sidecar_peer_identity` reached the peer's app beside the real header, and CGI,
/// WSGI, PHP and Rack read both as `HTTP_X_SIDECAR_PEER_IDENTITY`. Underscore names are dropped on the mesh hop
/// by default, and the underscore spellings of the sidecar's own headers always.
#[actix_rt::test]
async fn an_underscore_spelling_of_the_peer_identity_never_reaches_the_peer_app() {
    let pki = Pki::new("underscores");
    let app = RawUpstream::ok().await;
    let orders = Sidecar::start(&pki.policy(app.addr));
    let inbound = orders.inbound.expect("an inbound listener");
    let payments = Sidecar::start(&pki.outbound_policy(
        "payments",
        &format!("  orders:\n    mesh: true\n    endpoints: ['{inbound}']\n"),
    ));
    let reply = support::get(
        payments.addr,
        "/pay",
        &[
            ("target", "orders"),
            ("internal", "true"),
            ("x_sidecar_peer_identity", "spoof"),
            ("x-sidecar_peer-identity", "spoof"),
            ("x_user_id", "7"),
            ("x-user-id", "7"),
        ],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    // A peer that is not a sidecar (any holder of a mesh certificate) sends them straight to the listener.
    let (cert, key) = pki.issue("payments", Validity::default());
    let peer = connector(&pki.dir.join("ca.pem"), Some((&cert, &key)));
    assert_eq!(
        call(
            &peer,
            inbound,
            "x_sidecar_peer_identity: spoof\r\nx_user_id: 7\r\n"
        )
        .await,
        Ok(200)
    );

    for seen in app.wait_for(2).await {
        let mut names: Vec<&str> = seen
            .headers
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| k.contains('_') || k.contains("sidecar") || k.contains("user"))
            .collect();
        names.sort_unstable();
        assert_eq!(
            seen.all("x-sidecar-peer-identity"),
            ["spiffe://mesh.test/service/payments"]
        );
        assert!(
            names == ["x-sidecar-peer-identity", "x-user-id"]
                || names == ["x-sidecar-peer-identity"],
            "only the real identity and hyphenated names pass: {names:?}"
        );
    }
    payments.stop().await;
    orders.stop().await;
}

/// `mesh.headers_with_underscores: reject`: 400 `underscore-header` instead of a silent drop, both ways.
#[actix_rt::test]
async fn headers_with_underscores_can_be_refused_instead() {
    let pki = Pki::new("underscores-reject");
    let app = RawUpstream::ok().await;
    let policy = pki.policy(app.addr).replace(
        "  inbound:\n",
        "  headers_with_underscores: reject\n  inbound:\n",
    );
    let orders = Sidecar::start(&policy);
    let inbound = orders.inbound.expect("an inbound listener");
    let (cert, key) = pki.issue("payments", Validity::default());
    let peer = connector(&pki.dir.join("ca.pem"), Some((&cert, &key)));
    assert_eq!(call(&peer, inbound, "x_user_id: 7\r\n").await, Ok(400));
    assert_eq!(call(&peer, inbound, "x-user-id: 7\r\n").await, Ok(200));

    let payments = Sidecar::start(
        &pki.outbound_policy(
            "payments",
            &format!("  orders:\n    mesh: true\n    endpoints: ['{inbound}']\n"),
        )
        .replace(
            "services:\n",
            "  headers_with_underscores: reject\nservices:\n",
        ),
    );
    let reply = support::get(
        payments.addr,
        "/pay",
        &[
            ("target", "orders"),
            ("internal", "true"),
            ("x_user_id", "7"),
        ],
    )
    .await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert_eq!(reply.header("x-sidecar-error"), Some("underscore-header"));
    assert_eq!(app.received().len(), 1, "only the hyphenated call arrived");
    payments.stop().await;
    orders.stop().await;
}
