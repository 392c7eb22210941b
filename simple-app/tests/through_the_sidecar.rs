//! The demo from the app's side: simple-app (the real binary) calls another simple-app through the real
//! sidecar, and its knobs behave as documented.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sidecar::control::store::PolicySource;
use sidecar::policy::Policy;
use sidecar::server::{self, Listeners, RunOptions};

struct App(Child, SocketAddr);

impl App {
    fn start(name: &str, sidecar: Option<SocketAddr>) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_simple-app"));
        cmd.args(["--listen", &addr.to_string(), "--name", name])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        if let Some(s) = sidecar {
            cmd.args(["--sidecar", &format!("http://{s}")]);
        }
        let child = cmd.spawn().unwrap();
        let start = Instant::now();
        while TcpStream::connect(addr).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "simple-app never listened"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self(child, addr)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.1)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn get(url: &str) -> (u16, String) {
    let client = awc::Client::builder().disable_timeout().finish();
    let mut res = client.get(url).send().await.unwrap();
    let body = res.body().limit(1 << 20).await.unwrap();
    (
        res.status().as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[actix_rt::test]
async fn an_app_calls_another_through_its_sidecar_by_url_and_by_service_name() {
    let orders = App::start("orders", None);
    let policy = Policy::from_yaml(
        "test",
        &format!(
            "access_log:\n  enabled: false\nservices:\n  orders:\n    endpoints: ['{}']\n",
            orders.1
        ),
    )
    .unwrap();
    let listeners = Listeners {
        egress: TcpListener::bind("127.0.0.1:0").unwrap(),
        admin: None,
    };
    let sidecar = server::start(
        PolicySource::default(),
        policy,
        listeners,
        RunOptions::default(),
    )
    .unwrap();
    let shop = App::start("shop", Some(sidecar.egress));

    let (status, body) = get(&shop.url(&format!("/call?target={}", orders.url("/")))).await;
    assert_eq!(status, 200);
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["status"], 200);
    assert_eq!(answer["body"], "hello from orders\n");

    let (_, body) = get(&shop.url("/call?target=orders&internal=true&path=/echo")).await;
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let echoed: serde_json::Value = serde_json::from_str(answer["body"].as_str().unwrap()).unwrap();
    assert_eq!(echoed["app"], "orders");
    assert_eq!(echoed["path"], "/echo");
    let headers = echoed["headers"].as_array().unwrap();
    assert!(
        !headers
            .iter()
            .any(|h| h[0] == "target" || h[0] == "internal"),
        "{headers:?}"
    );

    let (_, body) = get(&shop.url("/call?target=payments&internal=true")).await;
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["status"], 503);
    assert_eq!(answer["sidecar_error"], "unknown-service");
    sidecar.stop(false).await;
}

#[actix_rt::test]
async fn the_knobs_set_status_size_and_latency() {
    let app = App::start("knobs", None);
    let (status, _) = get(&app.url("/?status=503")).await;
    assert_eq!(status, 503);
    let (status, body) = get(&app.url("/?size=1000")).await;
    assert_eq!((status, body.len()), (200, 1000));
    let (status, _) = get(&app.url("/echo?fail_rate=1")).await;
    assert_eq!(status, 500);
    let started = Instant::now();
    let (status, _) = get(&app.url("/?latency=200ms")).await;
    assert_eq!(status, 200);
    assert!(started.elapsed() >= Duration::from_millis(200));
}
