//! Load balancing and outlier ejection stories: several fake instances of one service, the real sidecar, a
//! real client.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly on purpose"
)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::{Conn, RawUpstream, Sidecar, get, request, response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// An instance that answers every request `200 ok` after `delay`, counting them.
struct Delayed {
    addr: SocketAddr,
    served: Arc<AtomicUsize>,
}

async fn delayed(delay: Duration) -> Delayed {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // Requests carry no body here: a head ends with an empty line.
                    while let Some(end) = support::find(&buf, b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        tokio::time::sleep(delay).await;
                        count.fetch_add(1, Ordering::SeqCst);
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    Delayed { addr, served }
}

const CALL: &[u8] = b"GET / HTTP/1.1\r\nhost: app\r\ntarget: orders\r\ninternal: true\r\n\r\n";

async fn targets(sidecar: &Sidecar) -> serde_json::Value {
    request(
        sidecar.admin,
        "GET /admin/targets HTTP/1.1\r\nhost: a\r\n\r\n",
    )
    .await
    .json()
}

#[actix_rt::test]
async fn p2c_ewma_sends_little_to_an_instance_ten_times_slower() {
    let fast_a = delayed(Duration::from_millis(2)).await;
    let fast_b = delayed(Duration::from_millis(2)).await;
    let slow = delayed(Duration::from_millis(20)).await;
    let sidecar = Sidecar::start(&format!(
        "services:\n  orders:\n    endpoints: ['{}', '{}', '{}']\n",
        fast_a.addr, fast_b.addr, slow.addr
    ));
    let end = Instant::now() + Duration::from_secs(2);
    let mut clients = Vec::new();
    for _ in 0..8 {
        let addr = sidecar.addr;
        clients.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            while Instant::now() < end {
                conn.send(CALL).await;
                assert_eq!(conn.read(false).await.status, 200);
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    let counts = [&fast_a, &fast_b, &slow].map(|d| d.served.load(Ordering::SeqCst));
    let total: usize = counts.iter().sum();
    let share = counts[2] as f64 / total as f64;
    eprintln!(
        "p2c-ewma: fast {} and {}, slow {} ({:.1} %)",
        counts[0],
        counts[1],
        counts[2],
        share * 100.0
    );
    assert!(total > 500, "the load ran: {total}");
    assert!(share < 0.10, "the slow instance got {:.1} %", share * 100.0);
    sidecar.stop().await;
}

#[actix_rt::test]
async fn a_failing_instance_is_ejected_then_readmitted_when_it_recovers() {
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let flaky = RawUpstream::start(move |_| {
        if h.load(Ordering::SeqCst) {
            response(200, &[("content-length", "2")], b"ok")
        } else {
            response(503, &[("content-length", "4")], b"down")
        }
    })
    .await;
    let (a, b) = (RawUpstream::ok().await, RawUpstream::ok().await);
    let sidecar = Sidecar::start(&format!(
        "services:\n  orders:\n    endpoints: ['{}', '{}', '{}']\n    load_balancer:\n      policy: round_robin\n    outlier_detection:\n      consecutive_failures: 3\n      base_ejection_time: 1s\n",
        a.addr, b.addr, flaky.addr
    ));
    // Clients see no errors: the first failures are retried on another instance, then it is ejected.
    for _ in 0..100 {
        let reply = get(
            sidecar.addr,
            "/",
            &[("target", "orders"), ("internal", "true")],
        )
        .await;
        assert_eq!(reply.status, 200);
    }
    assert_eq!(
        flaky.received().len(),
        3,
        "ejected after exactly 3 failures"
    );
    let state = targets(&sidecar).await;
    assert_eq!(state["services"]["orders"]["ejected"], 1, "{state}");

    // It recovers: once its ejection time is over, a request probes it, and it serves again.
    healthy.store(true, Ordering::SeqCst);
    support::eventually("a request probes the recovered instance", || async {
        assert_eq!(call_orders(&sidecar).await, 200);
        flaky.received().len() > 3
    })
    .await;
    let before = flaky.received().len();
    for _ in 0..30 {
        get(
            sidecar.addr,
            "/",
            &[("target", "orders"), ("internal", "true")],
        )
        .await;
    }
    assert!(
        flaky.received().len() >= before + 9,
        "readmitted to its share"
    );
    assert_eq!(targets(&sidecar).await["services"]["orders"]["ejected"], 0);
    sidecar.stop().await;
}

#[actix_rt::test]
async fn never_more_than_the_allowed_share_is_ejected() {
    let down = || RawUpstream::start(|_| response(503, &[("content-length", "0")], b""));
    let (x, y, ok) = (down().await, down().await, RawUpstream::ok().await);
    let sidecar = Sidecar::start(&format!(
        "services:\n  orders:\n    endpoints: ['{}', '{}', '{}']\n    outlier_detection:\n      consecutive_failures: 1\n      base_ejection_time: 60s\n",
        x.addr, y.addr, ok.addr
    ));
    for _ in 0..50 {
        get(
            sidecar.addr,
            "/",
            &[("target", "orders"), ("internal", "true")],
        )
        .await;
    }
    // 50 % of 3 endpoints: one may be ejected; the other failing one stays in rotation.
    let state = targets(&sidecar).await;
    assert_eq!(state["services"]["orders"]["ejected"], 1, "{state}");
    assert!(x.received().len() > 1 || y.received().len() > 1);
    sidecar.stop().await;
}

#[actix_rt::test]
async fn with_every_endpoint_ejected_the_answer_is_no_healthy_endpoint() {
    let down = || RawUpstream::start(|_| response(503, &[("content-length", "0")], b""));
    let (x, y) = (down().await, down().await);
    let sidecar = Sidecar::start(&format!(
        "services:\n  orders:\n    endpoints: ['{}', '{}']\n    retries:\n      max_retries: 0\n    circuit_breaker:\n      enabled: false\n    outlier_detection:\n      consecutive_failures: 1\n      base_ejection_time: 60s\n      max_ejection_percent: 100%\n",
        x.addr, y.addr
    ));
    let mut last = None;
    for _ in 0..5 {
        last = Some(
            get(
                sidecar.addr,
                "/",
                &[("target", "orders"), ("internal", "true")],
            )
            .await,
        );
    }
    let reply = last.unwrap();
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("x-sidecar-error"), Some("no-healthy-endpoint"));
    assert!(reply.header("retry-after").is_some());
    assert_eq!(x.received().len() + y.received().len(), 2);
    sidecar.stop().await;
}

#[actix_rt::test]
async fn consistent_hashing_keeps_a_key_on_one_instance() {
    let instances = [
        RawUpstream::ok().await,
        RawUpstream::ok().await,
        RawUpstream::ok().await,
        RawUpstream::ok().await,
    ];
    let endpoints: Vec<String> = instances.iter().map(|u| format!("'{}'", u.addr)).collect();
    let sidecar = Sidecar::start(&format!(
        "services:\n  carts:\n    endpoints: [{}]\n    load_balancer:\n      policy: consistent_hash\n      hash_key: 'header:x-user'\n",
        endpoints.join(", ")
    ));
    for user in ["alice", "bob", "carol", "dave", "erin"] {
        let before: Vec<usize> = instances.iter().map(|u| u.received().len()).collect();
        for _ in 0..10 {
            let reply = get(
                sidecar.addr,
                "/",
                &[("target", "carts"), ("internal", "true"), ("x-user", user)],
            )
            .await;
            assert_eq!(reply.status, 200);
        }
        let grew: Vec<usize> = instances
            .iter()
            .zip(&before)
            .map(|(u, b)| u.received().len() - b)
            .filter(|&n| n > 0)
            .collect();
        assert_eq!(grew, [10], "{user}'s requests all went to one instance");
    }
    sidecar.stop().await;
}

/// Issue 15 item 1: the hash was read after the header map had moved into the upstream request, so every key
/// hashed the empty value and went to one instance.
#[actix_rt::test]
async fn hash_key_header_spreads_different_keys_and_keeps_each_on_one_instance() {
    let instances = [
        RawUpstream::ok().await,
        RawUpstream::ok().await,
        RawUpstream::ok().await,
        RawUpstream::ok().await,
    ];
    let endpoints: Vec<String> = instances.iter().map(|u| format!("'{}'", u.addr)).collect();
    let sidecar = Sidecar::start(&format!(
        "services:\n  carts:\n    endpoints: [{}]\n    load_balancer:\n      policy: consistent_hash\n      hash_key: 'header:x-user'\n",
        endpoints.join(", ")
    ));
    let mut homes = std::collections::BTreeSet::new();
    for n in 0..32 {
        let user = format!("user-{n}");
        let before: Vec<usize> = instances.iter().map(|u| u.received().len()).collect();
        for _ in 0..3 {
            let reply = get(
                sidecar.addr,
                "/",
                &[("target", "carts"), ("internal", "true"), ("x-user", &user)],
            )
            .await;
            assert_eq!(reply.status, 200);
        }
        let grew: Vec<usize> = instances
            .iter()
            .zip(&before)
            .enumerate()
            .filter(|(_, (u, b))| u.received().len() > **b)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(grew.len(), 1, "{user}'s requests all went to one instance");
        homes.insert(grew[0]);
    }
    assert!(
        homes.len() >= 3,
        "32 keys over 4 instances land on at least 3 of them, got {homes:?}"
    );
    sidecar.stop().await;
}

#[actix_rt::test]
async fn active_health_checks_take_an_endpoint_out_and_bring_it_back() {
    let sick = Arc::new(AtomicBool::new(true));
    let s = sick.clone();
    let checked = RawUpstream::start(move |req| {
        if req.target == "/healthz" && s.load(Ordering::SeqCst) {
            response(503, &[("content-length", "0")], b"")
        } else {
            response(200, &[("content-length", "2")], b"ok")
        }
    })
    .await;
    let steady = RawUpstream::ok().await;
    let sidecar = Sidecar::start(&format!(
        "services:\n  orders:\n    endpoints: ['{}', '{}']\n    load_balancer:\n      policy: round_robin\n    outlier_detection:\n      enabled: false\n    health_check:\n      path: /healthz\n      interval: 50ms\n      timeout: 500ms\n      healthy_threshold: 1\n      unhealthy_threshold: 2\n",
        checked.addr, steady.addr
    ));
    let healthy =
        |state: serde_json::Value| state["services"]["orders"]["endpoints"][0]["healthy"].clone();
    support::eventually("the endpoint marked unhealthy", || async {
        healthy(targets(&sidecar).await) == false
    })
    .await;
    let served = |u: &RawUpstream| {
        u.received()
            .iter()
            .filter(|r| r.target != "/healthz")
            .count()
    };
    for _ in 0..20 {
        let reply = get(
            sidecar.addr,
            "/",
            &[("target", "orders"), ("internal", "true")],
        )
        .await;
        assert_eq!(reply.status, 200);
    }
    assert_eq!(
        served(&checked),
        0,
        "an unhealthy endpoint gets no requests"
    );
    assert_eq!(served(&steady), 20);

    sick.store(false, Ordering::SeqCst);
    support::eventually("the endpoint marked healthy again", || async {
        healthy(targets(&sidecar).await) == true
    })
    .await;
    for _ in 0..20 {
        get(
            sidecar.addr,
            "/",
            &[("target", "orders"), ("internal", "true")],
        )
        .await;
    }
    assert_eq!(served(&checked), 10, "back in rotation");
    sidecar.stop().await;
}

async fn call_orders(sidecar: &Sidecar) -> u16 {
    get(
        sidecar.addr,
        "/",
        &[("target", "orders"), ("internal", "true")],
    )
    .await
    .status
}

/// The requests each upstream got during `calls` more sequential calls.
async fn shares(sidecar: &Sidecar, upstreams: &[&RawUpstream], calls: usize) -> Vec<usize> {
    let before: Vec<usize> = upstreams.iter().map(|u| u.received().len()).collect();
    for _ in 0..calls {
        call_orders(sidecar).await;
    }
    upstreams
        .iter()
        .zip(before)
        .map(|(u, b)| u.received().len() - b)
        .collect()
}

#[actix_rt::test]
async fn round_robin_does_not_double_the_load_on_the_neighbour_of_an_ejected_endpoint() {
    // Issue 15, item 4: with one of four ejected, the other three got 50 / 25 / 25 %.
    let down = RawUpstream::start(|_| response(503, &[("content-length", "0")], b"")).await;
    let (a, b, c) = (
        RawUpstream::ok().await,
        RawUpstream::ok().await,
        RawUpstream::ok().await,
    );
    let sidecar = Sidecar::start(&format!(
        "services:\n  orders:\n    endpoints: ['{}', '{}', '{}', '{}']\n    load_balancer:\n      policy: round_robin\n    retries:\n      max_retries: 0\n    circuit_breaker:\n      enabled: false\n    outlier_detection:\n      consecutive_failures: 1\n      base_ejection_time: 60s\n",
        down.addr, a.addr, b.addr, c.addr
    ));
    for _ in 0..4 {
        call_orders(&sidecar).await;
    }
    assert_eq!(down.received().len(), 1);
    assert_eq!(targets(&sidecar).await["services"]["orders"]["ejected"], 1);
    let got = shares(&sidecar, &[&a, &b, &c], 300).await;
    eprintln!("one of four ejected: {got:?} of 300");
    for n in &got {
        assert!(
            (90..=110).contains(n),
            "shares {got:?}, a third each expected"
        );
    }
    sidecar.stop().await;
}

#[actix_rt::test]
async fn round_robin_gives_a_failing_endpoint_past_the_ejection_cap_only_its_share() {
    // Issue 15, item 4: a failing endpoint that the cap keeps in rotation drew the ejected one's turns too.
    let down = || RawUpstream::start(|_| response(503, &[("content-length", "0")], b""));
    let (x, y, ok) = (down().await, down().await, RawUpstream::ok().await);
    let sidecar = Sidecar::start(&format!(
        "services:\n  orders:\n    endpoints: ['{}', '{}', '{}']\n    load_balancer:\n      policy: round_robin\n    retries:\n      max_retries: 0\n    circuit_breaker:\n      enabled: false\n    outlier_detection:\n      consecutive_failures: 1\n      base_ejection_time: 60s\n",
        x.addr, y.addr, ok.addr
    ));
    for _ in 0..3 {
        call_orders(&sidecar).await;
    }
    // 50 % of three: one is ejected (the first to fail), the other failing one stays in rotation.
    assert_eq!(targets(&sidecar).await["services"]["orders"]["ejected"], 1);
    let got = shares(&sidecar, &[&x, &y, &ok], 300).await;
    eprintln!("past the ejection cap: {got:?} of 300");
    let failing = got[0].max(got[1]);
    assert_eq!(got[0].min(got[1]), 0, "one failing endpoint is ejected");
    assert!(
        (135..=165).contains(&failing),
        "the failing endpoint in rotation got {failing} of 300, half expected"
    );
    sidecar.stop().await;
}

#[actix_rt::test]
async fn health_checks_run_at_the_configured_interval() {
    // Issue 15, item 5: a 100 ms tick plus scheduling from completion made 50 ms checks every 100 ms.
    let upstream = RawUpstream::ok().await;
    let sidecar = Sidecar::start(&format!(
        "services:\n  orders:\n    endpoints: ['{}']\n    health_check:\n      path: /healthz\n      interval: 50ms\n      timeout: 500ms\n",
        upstream.addr
    ));
    upstream.wait_for(1).await;
    let first = Instant::now();
    upstream.wait_for(21).await;
    let took = first.elapsed();
    eprintln!("20 intervals of 50 ms took {took:?}");
    assert!(
        took >= Duration::from_millis(900),
        "checks ran faster than the interval: {took:?}"
    );
    assert!(
        took < Duration::from_millis(1_400),
        "20 intervals of 50 ms took {took:?}"
    );
    assert!(upstream.received().iter().all(|r| r.target == "/healthz"));
    sidecar.stop().await;
}
