//! Fan-out, told as stories: one app request goes to every target of a group (a fast one, a failing one and
//! one that never answers), and the app hears what its group's mode says, with `x-sidecar-fanout` telling
//! what happened to each.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

mod support;

use std::time::{Duration, Instant};

use support::{Conn, RawUpstream, Reply, Sidecar, eventually, get, response};

/// Three targets in the order written: fast (200 `ok`), failing (500) and silent (never answers).
struct Three {
    fast: RawUpstream,
    failing: RawUpstream,
    silent: RawUpstream,
}

impl Three {
    async fn start() -> Self {
        Self {
            fast: RawUpstream::ok().await,
            failing: RawUpstream::start(|_| {
                response(500, &[("content-length", "4"), ("x-why", "down")], b"down")
            })
            .await,
            silent: RawUpstream::silent().await,
        }
    }

    /// A group named `g` over the three, with `extra` lines of its own (indented by four spaces); its timeout
    /// is 400 ms unless `extra` sets one.
    fn group(&self, extra: &str) -> String {
        let timeout = if extra.contains("timeout:") {
            ""
        } else {
            "    timeout: 400ms\n"
        };
        format!(
            "fanout:\n  g:\n    targets:\n      - {{to: '{}', name: fast}}\n      - {{to: '{}', name: failing}}\n      - {{to: '{}', name: silent}}\n{timeout}{extra}",
            self.fast.url(""),
            self.failing.url(""),
            self.silent.url("")
        )
    }
}

async fn post(addr: std::net::SocketAddr, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut raw = format!(
        "POST /hook?x=1 HTTP/1.1\r\ncontent-length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| *k == "host") {
        raw.push_str("host: localhost\r\n");
    }
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    raw.push_str("\r\n");
    let mut bytes = raw.into_bytes();
    bytes.extend_from_slice(body);
    let mut conn = Conn::open(addr).await;
    conn.send(&bytes).await;
    conn.read(false).await
}

#[actix_rt::test]
async fn the_seeds_duplicator_set_up_answers_202_and_every_target_gets_the_same_request() {
    let app_1 = RawUpstream::ok().await;
    let app_2 = RawUpstream::start(|_| response(500, &[("content-length", "0")], b"")).await;
    // The seed's two RequestClones for one host, written as one group: one target a URL, one a service.
    let yaml = format!(
        "services:\n  webhook-receiver-app-2:\n    endpoints: ['{}']\nfanout:\n  webhook-receiver:\n    hosts: [webhook-receiver.example.com]\n    targets:\n      - to: {}\n      - to: webhook-receiver-app-2\n",
        app_2.addr,
        app_1.url("")
    );
    let sidecar = Sidecar::start(&yaml);

    let body = br#"{"event":"push"}"#;
    let reply = post(
        sidecar.addr,
        &[
            ("host", "Webhook-Receiver.example.com:8080"),
            ("x-hook", "1"),
        ],
        body,
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    assert_eq!(reply.header("x-sidecar-fanout"), Some("queued=2"));

    for target in [&app_1, &app_2] {
        let got = &target.wait_for(1).await[0];
        assert_eq!(got.body, body, "every target gets the whole body");
        assert_eq!(got.target, "/hook?x=1");
        assert_eq!(got.header("x-hook"), Some("1"));
        assert_eq!(got.all("host"), [target.addr.to_string()]);
    }

    // A request for another host is not fanned out (and, with no `target` and no dispatch rules, refused).
    let other = post(sidecar.addr, &[("host", "other.example.com")], b"x").await;
    assert_eq!(other.header("x-sidecar-error"), Some("missing-target"));
    eventually("both targets' outcomes are counted", || async {
        let m = get(sidecar.admin, "/metrics", &[]).await.text();
        m.contains("sidecar_fanout_requests_total{group=\"webhook-receiver\",target=\"webhook-receiver-app-2\",outcome=\"failed\"} 1")
            && m.lines().any(|l| {
                l.starts_with("sidecar_fanout_requests_total{group=\"webhook-receiver\",target=\"http://")
                    && l.contains("outcome=\"ok\"} 1")
            })
    })
    .await;
    sidecar.stop().await;
}

#[actix_rt::test]
async fn first_success_relays_the_first_2xx_without_waiting_for_the_slow_target() {
    let three = Three::start().await;
    let sidecar = Sidecar::start(&three.group("    mode: first_success\n    timeout: 10s\n"));

    let started = Instant::now();
    let reply = post(sidecar.addr, &[("fanout", "g")], b"payload").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, b"ok");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "waited for the silent target: {:?}",
        started.elapsed()
    );
    let said = reply.header("x-sidecar-fanout").unwrap();
    assert!(said.starts_with("ok=1,"), "{said}");
    assert!(
        said.contains("cancelled="),
        "the silent one is cancelled: {said}"
    );
    assert_eq!(three.silent.wait_for(1).await[0].body, b"payload");
    assert_eq!(
        three.fast.received()[0].header("fanout"),
        None,
        "the sidecar's own header stays out"
    );
    sidecar.stop().await;
}

#[actix_rt::test]
async fn all_waits_for_every_target_and_answers_the_success_or_the_failure_as_preferred() {
    let three = Three::start().await;
    let yaml = format!(
        "{}  worst:\n    mode: AwaitAllPreferFailed\n    timeout: 400ms\n    targets:\n      - {{to: '{}'}}\n      - {{to: '{}'}}\n",
        three.group("    mode: all\n"),
        three.fast.url(""),
        three.failing.url("")
    );
    let sidecar = Sidecar::start(&yaml);

    let started = Instant::now();
    let best = post(sidecar.addr, &[("fanout", "g")], b"a").await;
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "`all` waits for every target, the silent one until its timeout"
    );
    assert_eq!(best.status, 200);
    assert_eq!(best.body, b"ok");
    assert_eq!(
        best.header("x-sidecar-fanout"),
        Some("ok=1,failed=1,timeout=1")
    );

    let worst = post(sidecar.addr, &[("fanout", "worst")], b"b").await;
    assert_eq!(worst.status, 500, "the failure is preferred");
    assert_eq!(worst.body, b"down");
    assert_eq!(worst.header("x-why"), Some("down"));
    assert_eq!(
        worst.header("x-sidecar-fanout"),
        Some("ok=1,failed=1,timeout=0")
    );
    sidecar.stop().await;
}

#[actix_rt::test]
async fn a_report_shows_every_targets_answer_and_is_no_success_when_one_failed() {
    let three = Three::start().await;
    let sidecar = Sidecar::start(&three.group("    mode: AwaitAllReport\n    report_body: 3B\n"));

    let reply = post(sidecar.addr, &[("fanout", "g")], b"x").await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let report = reply.json();
    assert_eq!(report["group"], "g");
    assert_eq!(
        (report["ok"].as_u64(), report["failed"].as_u64()),
        (Some(1), Some(1))
    );
    let targets = report["targets"].as_array().unwrap();
    let names: Vec<&str> = targets
        .iter()
        .map(|t| t["target"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["fast", "failing", "silent"], "in the order written");
    assert_eq!(targets[0]["status"], 200);
    assert_eq!(targets[0]["body"], "ok");
    assert_eq!(targets[0]["body_truncated"], false);
    assert_eq!(targets[1]["status"], 500);
    assert_eq!(targets[1]["body"], "dow", "cut at report_body, and said so");
    assert_eq!(targets[1]["body_truncated"], true);
    assert_eq!(targets[1]["headers"]["x-why"][0], "down");
    assert_eq!(targets[2]["outcome"], "timeout");
    assert_eq!(targets[2]["error"], "request-timeout");
    assert!(targets[2]["duration_ms"].as_f64().unwrap() >= 400.0);
    sidecar.stop().await;
}

#[actix_rt::test]
async fn refusals_send_nothing_and_say_why() {
    let three = Three::start().await;
    let yaml = format!(
        "{}  queued:\n    queue: 1\n    targets: [{{to: '{}'}}]\n    timeout: 10s\n",
        three.group("    mode: all\n    max_body: 1KiB\n"),
        three.silent.url("")
    );
    let sidecar = Sidecar::start(&yaml);

    let none = post(sidecar.addr, &[("fanout", "nope")], b"x").await;
    assert_eq!(none.status, 503);
    assert_eq!(none.header("x-sidecar-error"), Some("no-fanout-group"));

    // Over max_body, announced or chunked: 413 before any target hears of it.
    let big = vec![b'b'; 2048];
    let announced = post(sidecar.addr, &[("fanout", "g")], &big).await;
    assert_eq!(announced.status, 413);
    assert_eq!(announced.header("x-sidecar-error"), Some("body-too-large"));
    let mut conn = Conn::open(sidecar.addr).await;
    let mut chunked =
        b"POST / HTTP/1.1\r\nhost: localhost\r\nfanout: g\r\ntransfer-encoding: chunked\r\n\r\n800\r\n"
            .to_vec();
    chunked.extend_from_slice(&big);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    conn.send(&chunked).await;
    let streamed = conn.read(false).await;
    assert_eq!(streamed.status, 413);
    assert!(three.fast.received().is_empty() && three.failing.received().is_empty());

    // Async with a queue of one: the first is taken (its target never answers), the second refused at once.
    let first = post(sidecar.addr, &[("fanout", "queued")], b"1").await;
    assert_eq!(first.status, 202);
    let second = post(sidecar.addr, &[("fanout", "queued")], b"2").await;
    assert_eq!(second.status, 503);
    assert_eq!(second.header("x-sidecar-error"), Some("overloaded"));
    sidecar.stop().await;
}

#[actix_rt::test]
async fn a_targets_own_breaker_applies_and_shows_in_the_report() {
    let fast = RawUpstream::ok().await;
    let down = RawUpstream::start(|_| response(503, &[("content-length", "0")], b"")).await;
    let yaml = format!(
        "services:\n  flaky:\n    endpoints: ['{}']\n    retries:\n      max_retries: 0\n    circuit_breaker:\n      consecutive_failures: 2\n      failure_rate:\n        enabled: false\n      open:\n        base: 60s\nfanout:\n  g:\n    mode: all\n    answer: report\n    targets: [{{to: '{}', name: fast}}, {{to: flaky}}]\n",
        down.addr,
        fast.url("")
    );
    let sidecar = Sidecar::start(&yaml);
    for _ in 0..2 {
        let r = post(sidecar.addr, &[("fanout", "g")], b"x").await;
        assert_eq!(r.json()["targets"][1]["status"], 503);
    }
    let r = post(sidecar.addr, &[("fanout", "g")], b"x").await;
    let flaky = &r.json()["targets"][1];
    assert_eq!(flaky["error"], "circuit-open", "{flaky}");
    assert_eq!(
        down.received().len(),
        2,
        "the open breaker sent nothing more"
    );
    assert_eq!(r.json()["targets"][0]["status"], 200);
    sidecar.stop().await;
}
