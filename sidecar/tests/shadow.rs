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

/// A listener whose connections are read one byte a second (with a receive buffer of a few KiB, so that the
/// kernel soon stops taking bytes for it) and never answered.
async fn trickle() -> std::net::SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(64).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut byte = [0u8; 1];
                while matches!(stream.read(&mut byte).await, Ok(1)) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
        }
    });
    addr
}

/// Sends `n` POSTs of `body` through the sidecar one after another, each answered 200; returns how long they took.
async fn posts(sidecar: std::net::SocketAddr, n: usize, body: &[u8]) -> Duration {
    let started = Instant::now();
    let head = format!(
        "POST /orders HTTP/1.1\r\nhost: app\r\ntarget: orders\r\ninternal: true\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let mut conn = Conn::open(sidecar).await;
    for _ in 0..n {
        conn.send(head.as_bytes()).await;
        conn.send(body).await;
        assert_eq!(conn.read(false).await.status, 200);
    }
    started.elapsed()
}

#[actix_rt::test]
async fn a_shadow_that_hangs_refuses_or_reads_a_byte_a_second_never_slows_the_primary() {
    let primary = RawUpstream::ok().await;
    let hanging = RawUpstream::silent().await;
    let trickling = trickle().await;
    // A port nothing listens on: connections are refused.
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        format!("http://{addr}")
    };
    let body: Vec<u8> = (0..(4 << 20)).map(|i: u32| (i % 253) as u8).collect();
    const N: usize = 10;

    // The same requests without a shadow: what "as fast as without one" means on this machine, now.
    let bare = Sidecar::start(&format!(
        "services:\n  orders:\n    endpoints: ['{}']\n",
        primary.addr
    ));
    let without = posts(bare.addr, N, &body).await;
    bare.stop().await;

    let yaml = format!(
        "services:\n  orders:\n    endpoints: ['{}']\n    shadow:\n      - to: {}\n        name: hanging\n        methods: [GET, POST]\n        timeout: 30s\n        max_concurrency: 4\n      - to: {refused}\n        name: refused\n        methods: [GET, POST]\n      - to: http://{trickling}\n        name: trickling\n        methods: [GET, POST]\n        timeout: 30s\n        buffer: 64KiB\n",
        primary.addr,
        hanging.url("")
    );
    let sidecar = Sidecar::start(&yaml);
    let with = posts(sidecar.addr, N, &body).await;
    let started = Instant::now();
    for _ in 0..50 {
        assert_eq!(get(sidecar.addr, "/", &ORDERS).await.status, 200);
    }
    let gets = started.elapsed();

    // Within the noise of the same requests without a shadow (the copies cost some CPU on a 2-core machine,
    // never a wait: one wait on a copy would take 30 s).
    assert!(
        with <= without * 2 + Duration::from_millis(500),
        "{N} uploads took {with:?} with the misbehaving shadows, {without:?} without"
    );
    assert!(gets < Duration::from_secs(3), "50 GETs took {gets:?}");
    let received = primary.received();
    assert_eq!(received.len(), 2 * N + 50);
    assert!(
        received
            .iter()
            .filter(|r| r.method == "POST")
            .all(|r| r.body == body),
        "every upload reached the primary whole"
    );
    let metrics = get(sidecar.admin, "/metrics", &[]).await.text();
    for dropped in [
        "copy=\"hanging\",reason=\"concurrency\"",
        "copy=\"trickling\",reason=\"slow\"",
    ] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("sidecar_shadow_dropped_total{") && l.contains(dropped)),
            "{dropped} is counted:\n{metrics}"
        );
    }
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sidecar_shadow_requests_total{")
                && l.contains("copy=\"refused\"")
                && l.contains("outcome=\"failed\"")),
        "the refused copies are counted as failed:\n{metrics}"
    );
    sidecar.stop().await;
}

/// An upstream that hashes each request body as it streams (nothing kept) and answers 200; the hashes and
/// lengths it saw are sent on the channel.
async fn hashing() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(u64, u64)>,
) {
    use std::hash::Hasher;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut head = Vec::new();
                let body_start = loop {
                    let n = stream.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                    if let Some(i) = support::find(&head, b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let text = String::from_utf8_lossy(&head[..body_start]).to_ascii_lowercase();
                let length: u64 = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .expect("the upload keeps its length")
                    .trim()
                    .parse()
                    .unwrap();
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                hasher.write(&head[body_start..]);
                let mut seen = (head.len() - body_start) as u64;
                while seen < length {
                    let n = stream.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    hasher.write(&buf[..n]);
                    seen += n as u64;
                }
                let _ = tx.send((hasher.finish(), seen));
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await;
            });
        }
    });
    (addr, rx)
}

#[actix_rt::test]
async fn a_256_mib_upload_reaches_a_copy_that_keeps_up_byte_for_byte_while_a_stalled_copy_is_abandoned()
 {
    use std::hash::Hasher;
    use support::process::{SidecarProcess, free_port, sidecar_bin};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (primary, mut primary_saw) = hashing().await;
    let (keeping_up, mut copy_saw) = hashing().await;
    // Accepts and never reads: the copy's bytes stop at its socket buffers.
    let stalled = {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(8).unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        addr
    };
    let dir = std::env::temp_dir().join(format!("sidecar-shadow-upload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "services:\n  orders:\n    endpoints: ['{primary}']\n    timeouts:\n      request: 120s\n    shadow:\n      - to: http://{keeping_up}\n        name: keeping-up\n        methods: [POST]\n        timeout: 120s\n        buffer: 16MiB\n      - to: http://{stalled}\n        name: stalled\n        methods: [POST]\n        timeout: 120s\n"
        ),
    )
    .unwrap();
    let admin_port = free_port();
    let mut cmd = sidecar_bin();
    cmd.arg("--policy")
        .arg(&policy)
        .env_remove("SIDECAR_CONFIG")
        .current_dir(&dir);
    let sidecar = SidecarProcess::spawn_with_admin(cmd, admin_port);
    let idle_rss = sidecar.rss();

    const TOTAL: u64 = 256 << 20;
    let mut chunk: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    let mut sent = std::collections::hash_map::DefaultHasher::new();
    let mut conn = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    conn.write_all(
        format!(
            "POST /upload HTTP/1.1\r\nhost: app\r\ntarget: orders\r\ninternal: true\r\ncontent-length: {TOTAL}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    for i in 0..(TOTAL >> 20) {
        // Each MiB differs, so a lost, repeated or reordered one changes the hash.
        chunk[..8].copy_from_slice(&i.to_le_bytes());
        sent.write(&chunk);
        conn.write_all(&chunk).await.unwrap();
    }
    let sent = sent.finish();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut buf = [0u8; 4096];
        while support::find(&reply, b"\r\n\r\n").is_none() {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "the sidecar closed without an answer");
            reply.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the upload was answered");
    assert!(
        reply.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&reply)
    );

    assert_eq!(
        primary_saw.recv().await,
        Some((sent, TOTAL)),
        "the primary got every byte"
    );
    let copied = tokio::time::timeout(support::DEADLINE, copy_saw.recv())
        .await
        .expect("the copy that kept up was answered");
    assert_eq!(copied, Some((sent, TOTAL)), "the copy got the same bytes");

    let admin: std::net::SocketAddr = ([127, 0, 0, 1], admin_port).into();
    let metrics = get(admin, "/metrics", &[]).await.text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sidecar_shadow_dropped_total{")
                && l.contains("copy=\"stalled\",reason=\"slow\"")
                && l.ends_with(" 1")),
        "the stalled copy is abandoned and counted:\n{metrics}"
    );
    // Three streams of 256 MiB went through; what the sidecar held is its buffers, not the upload.
    let grew = sidecar.peak_rss().saturating_sub(idle_rss);
    assert!(
        grew < 48 << 20,
        "peak RSS grew by {} MiB over {} MiB idle",
        grew >> 20,
        idle_rss >> 20
    );
    drop(sidecar);
    let _ = std::fs::remove_dir_all(&dir);
}

#[actix_rt::test]
async fn a_10_percent_sample_copies_about_one_request_in_ten_and_a_keyed_one_copies_a_key_whole() {
    let primary = RawUpstream::ok().await;
    let sampled = RawUpstream::ok().await;
    let keyed = RawUpstream::ok().await;
    let yaml = format!(
        "services:\n  orders:\n    endpoints: ['{}']\n    shadow:\n      - to: {}\n        sample: 10%\n      - to: {}\n        sample: 50%\n        key: x-session\n",
        primary.addr,
        sampled.url(""),
        keyed.url("")
    );
    let sidecar = Sidecar::start(&yaml);
    const N: usize = 2000;
    let mut conn = Conn::open(sidecar.addr).await;
    for i in 0..N {
        // 200 sessions, ten requests each.
        let raw = format!(
            "GET /{i} HTTP/1.1\r\nhost: app\r\ntarget: orders\r\ninternal: true\r\nx-session: s{}\r\n\r\n",
            i % 200
        );
        conn.send(raw.as_bytes()).await;
        assert_eq!(conn.read(false).await.status, 200);
    }
    // Every copy handed off is answered (the shadows are healthy): wait until both counts stand still.
    let sent = |metrics: &str, copy: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("sidecar_shadow_requests_total{") && l.contains(copy))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    support::eventually("every copy was answered", || async {
        let metrics = get(sidecar.admin, "/metrics", &[]).await.text();
        sent(&metrics, &format!("copy=\"{}\"", sampled.url(""))) == sampled.received().len() as u64
            && sent(&metrics, &format!("copy=\"{}\"", keyed.url("")))
                == keyed.received().len() as u64
    })
    .await;

    // Binomial(2000, 0.1): mean 200, standard deviation 13.4; five deviations either side.
    let copies = sampled.received().len();
    assert!(
        (133..=267).contains(&copies),
        "{copies} of {N} copied at 10 %"
    );

    let mut per_session = std::collections::HashMap::<String, usize>::new();
    for r in keyed.received() {
        *per_session
            .entry(r.header("x-session").unwrap().to_string())
            .or_default() += 1;
    }
    assert!(
        per_session.values().all(|&n| n == 10),
        "a session is copied whole or not at all: {per_session:?}"
    );
    // Binomial(200, 0.5) sessions: mean 100, standard deviation 7.1.
    assert!(
        (65..=135).contains(&per_session.len()),
        "{} of 200 sessions copied at 50 %",
        per_session.len()
    );
    sidecar.stop().await;
}
