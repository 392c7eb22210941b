//! Traffic copies, told as stories: a primary upstream answers the app, a shadow upstream shows what the copy
//! carried, and a shadow that misbehaves never slows the app.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

mod support;

use std::time::{Duration, Instant};

use support::{Conn, RawUpstream, Sidecar, get};

fn policy(primary: &RawUpstream, copy: &str, extra: &str) -> String {
    format!(
        "services:\n  orders:\n    endpoints: ['{}']\n    shadow:\n      - to: {copy}\n        timeout: 300ms\n{extra}",
        primary.addr
    )
}

const ORDERS: [(&str, &str); 2] = [("target", "orders"), ("internal", "true")];

#[actix_rt::test]
async fn a_get_is_copied_with_its_path_and_headers_and_marked_as_a_copy() {
    let primary = RawUpstream::ok().await;
    let shadow = RawUpstream::ok().await;
    let sidecar = Sidecar::start(&policy(&primary, &shadow.url(""), ""));

    let mut headers = ORDERS.to_vec();
    headers.push(("x-app", "1"));
    assert_eq!(get(sidecar.addr, "/items?id=7", &headers).await.status, 200);

    let copy = &shadow.wait_for(1).await[0];
    assert_eq!(copy.target, "/items?id=7");
    assert_eq!(copy.header("x-app"), Some("1"));
    assert_eq!(copy.header("x-sidecar-shadow"), Some("orders"));
    assert_eq!(copy.all("host"), [shadow.addr.to_string()]);
    assert_eq!(
        copy.header("target"),
        None,
        "the sidecar's own headers stay out"
    );
    assert!(primary.received()[0].header("x-sidecar-shadow").is_none());
    sidecar.stop().await;
}

#[actix_rt::test]
async fn a_post_is_not_copied_unless_the_copy_says_so_and_then_its_body_arrives_whole() {
    let primary = RawUpstream::ok().await;
    let safe = RawUpstream::ok().await;
    let writes = RawUpstream::ok().await;
    let yaml = format!(
        "services:\n  orders:\n    endpoints: ['{}']\n    shadow:\n      - to: {}\n      - to: {}\n        methods: [POST]\n",
        primary.addr,
        safe.url(""),
        writes.url("")
    );
    let sidecar = Sidecar::start(&yaml);

    // One small body (kept for replay) and one of 1 MiB (streamed, teed to the copy).
    let big: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i % 251) as u8).collect();
    for (i, body) in [b"hello".to_vec(), big].into_iter().enumerate() {
        let mut raw = format!(
            "POST /orders HTTP/1.1\r\nhost: app\r\ntarget: orders\r\ninternal: true\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        raw.extend_from_slice(&body);
        let mut conn = Conn::open(sidecar.addr).await;
        conn.send(&raw).await;
        let reply = conn.read(false).await;
        assert_eq!(reply.status, 200);
        let n = i + 1;
        let copied = writes.wait_for(n).await;
        assert_eq!(copied[n - 1].body, body, "the copy carries the same bytes");
        assert_eq!(primary.received().last().unwrap().body, body);
    }
    assert!(
        safe.received().is_empty(),
        "POST is not a safe method: not copied by default"
    );
    sidecar.stop().await;
}

#[actix_rt::test]
async fn a_shadow_that_hangs_or_refuses_never_slows_the_primary() {
    let primary = RawUpstream::ok().await;
    let hanging = RawUpstream::silent().await;
    // A port nothing listens on: connections are refused.
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        format!("http://{addr}")
    };
    let yaml = format!(
        "services:\n  orders:\n    endpoints: ['{}']\n    shadow:\n      - to: {}\n        timeout: 5s\n        max_concurrency: 4\n      - to: {refused}\n",
        primary.addr,
        hanging.url("")
    );
    let sidecar = Sidecar::start(&yaml);
    let started = Instant::now();
    for _ in 0..50 {
        assert_eq!(get(sidecar.addr, "/", &ORDERS).await.status, 200);
    }
    // Fifty sequential loopback requests take milliseconds; one wait on a copy would take seconds.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the primary waited for a copy: {:?}",
        started.elapsed()
    );
    assert_eq!(primary.received().len(), 50);
    let metrics = get(sidecar.admin, "/metrics", &[]).await.text();
    assert!(
        metrics.contains("sidecar_shadow_dropped_total{copy=\"")
            && metrics.contains("reason=\"concurrency\""),
        "copies past the hanging shadow's limit are dropped and counted:\n{metrics}"
    );
    sidecar.stop().await;
}
