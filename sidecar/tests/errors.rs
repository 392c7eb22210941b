//! When the sidecar answers for itself: a precise status, `x-sidecar-error`, a JSON body naming cause and
//! target, and never a 2xx. Framing attacks are refused before anything is forwarded.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

mod support;

use std::time::Duration;

use support::{Conn, RawUpstream, Reply, Sidecar, get, response};
use tokio::io::AsyncWriteExt;

fn assert_refused(reply: &Reply, status: u16, cause: &str) {
    assert_eq!(reply.status, status, "{}\n{}", reply.head, reply.text());
    assert_eq!(
        reply.header("x-sidecar-error"),
        Some(cause),
        "{}",
        reply.head
    );
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let body = reply.json();
    assert_eq!(body["error"], cause);
    assert_eq!(body["status"], status);
}

#[actix_rt::test]
async fn without_target_or_dispatch_rules_the_request_is_refused_with_400() {
    let sidecar = Sidecar::start("{}");
    assert_refused(&get(sidecar.addr, "/", &[]).await, 400, "missing-target");
    sidecar.stop().await;
}

#[actix_rt::test]
async fn bad_targets_and_internal_values_are_precise_400s() {
    let sidecar = Sidecar::start("{}");
    let reply = get(sidecar.addr, "/", &[("target", "ftp://files/x")]).await;
    assert_refused(&reply, 400, "bad-target");
    assert_eq!(reply.json()["target"], "ftp://files/x");
    let reply = get(sidecar.addr, "/", &[("target", "orders")]).await;
    assert_refused(&reply, 400, "bad-target");
    assert!(
        reply.json()["detail"]
            .as_str()
            .unwrap()
            .contains("internal: true")
    );
    let reply = get(
        sidecar.addr,
        "/",
        &[("target", "orders"), ("internal", "maybe")],
    )
    .await;
    assert_refused(&reply, 400, "bad-internal-header");
    sidecar.stop().await;
}

#[actix_rt::test]
async fn an_unknown_service_is_an_error_never_a_guess() {
    let upstream = RawUpstream::ok().await;
    let sidecar = Sidecar::start(&format!(
        "services:\n  orders:\n    endpoints: ['{}']\n",
        upstream.addr
    ));
    let reply = get(
        sidecar.addr,
        "/",
        &[("target", "payments"), ("internal", "true")],
    )
    .await;
    assert_refused(&reply, 503, "unknown-service");
    assert_eq!(reply.json()["target"], "payments");
    assert!(upstream.received().is_empty());
    sidecar.stop().await;
}

#[actix_rt::test]
async fn an_upstream_that_refuses_connections_gives_502() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = format!("http://{}/x", closed.local_addr().unwrap());
    drop(closed);
    let sidecar = Sidecar::start("{}");
    let reply = get(sidecar.addr, "/", &[("target", &target)]).await;
    assert_refused(&reply, 502, "upstream-refused");
    assert_eq!(reply.json()["target"], target);
    // The sidecar is still there.
    assert_refused(
        &get(sidecar.addr, "/", &[("target", &target)]).await,
        502,
        "upstream-refused",
    );
    sidecar.stop().await;
}

#[actix_rt::test]
async fn an_upstream_that_never_answers_gives_504_after_the_request_timeout() {
    let upstream = RawUpstream::silent().await;
    let sidecar = Sidecar::start("defaults:\n  timeouts:\n    request: 300ms\n");
    let started = std::time::Instant::now();
    let reply = get(sidecar.addr, "/", &[("target", &upstream.url(""))]).await;
    assert_refused(&reply, 504, "request-timeout");
    assert!(started.elapsed() >= Duration::from_millis(300));
    sidecar.stop().await;
}

#[actix_rt::test]
async fn a_service_timeout_overrides_the_default() {
    let upstream = RawUpstream::silent().await;
    let sidecar = Sidecar::start(&format!(
        "services:\n  slow:\n    endpoints: ['{}']\n    timeouts:\n      request: 100ms\n",
        upstream.addr
    ));
    let reply = get(
        sidecar.addr,
        "/",
        &[("target", "slow"), ("internal", "true")],
    )
    .await;
    assert_refused(&reply, 504, "request-timeout");
    sidecar.stop().await;
}

#[actix_rt::test]
async fn an_upstream_that_hangs_up_gives_502_reset() {
    let upstream =
        RawUpstream::start(|_| b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-len".to_vec())
            .await;
    let sidecar = Sidecar::start("{}");
    let reply = get(sidecar.addr, "/", &[("target", &upstream.url(""))]).await;
    assert_refused(&reply, 502, "upstream-reset");
    sidecar.stop().await;
}

#[actix_rt::test]
async fn an_upstream_that_speaks_something_else_gives_502() {
    let upstream = RawUpstream::start(|_| b"SSH-2.0-OpenSSH_9.2\r\n\r\n".to_vec()).await;
    let sidecar = Sidecar::start("{}");
    let reply = get(sidecar.addr, "/", &[("target", &upstream.url(""))]).await;
    assert_refused(&reply, 502, "upstream-protocol-error");
    sidecar.stop().await;
}

#[actix_rt::test]
async fn a_body_cut_short_by_the_upstream_is_never_passed_off_as_complete() {
    let upstream = RawUpstream::start(|_| {
        response(
            200,
            &[("content-length", "100"), ("connection", "close")],
            b"only ten b",
        )
    })
    .await;
    let sidecar = Sidecar::start("{}");
    let mut conn = Conn::open(sidecar.addr).await;
    let raw = format!(
        "GET / HTTP/1.1\r\nhost: x\r\ntarget: {}\r\n\r\n",
        upstream.url("")
    );
    conn.send(raw.as_bytes()).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        support::DEADLINE,
        tokio::io::AsyncReadExt::read_to_end(&mut conn_stream(&mut conn), &mut buf),
    )
    .await;
    assert!(read.is_ok(), "the connection was left hanging");
    // Either the head and part of the body arrived before the connection was cut, or nothing did: never a
    // complete 100-byte body.
    if let Some(end) = support::find(&buf, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&buf[..end]);
        assert!(head.contains("content-length: 100"), "{head}");
        let body = &buf[end + 4..];
        assert!(
            body.len() < 100,
            "a short body was padded or completed: {}",
            body.len()
        );
    }
    sidecar.stop().await;
}

fn conn_stream(conn: &mut Conn) -> &mut tokio::net::TcpStream {
    conn.stream_mut()
}

#[actix_rt::test]
async fn content_length_with_transfer_encoding_is_refused_and_nothing_is_smuggled() {
    let upstream = RawUpstream::ok().await;
    let sidecar = Sidecar::start("{}");
    let target = upstream.url("");
    let smuggled = format!("GET /smuggled HTTP/1.1\r\nhost: x\r\ntarget: {target}\r\n\r\n");
    let raw = format!(
        "POST /front HTTP/1.1\r\nhost: x\r\ntarget: {target}\r\ncontent-length: {}\r\n\
         transfer-encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}",
        5 + smuggled.len()
    );
    let mut conn = Conn::open(sidecar.addr).await;
    conn.send(raw.as_bytes()).await;
    let reply = conn.read(false).await;
    assert_eq!(reply.status, 400);
    assert!(
        conn.closed().await,
        "the connection stayed open after a framing error"
    );
    // Prove the upstream is reachable and saw only this later, honest request.
    assert_eq!(
        get(sidecar.addr, "/after", &[("target", &target)])
            .await
            .status,
        200
    );
    let seen = upstream.wait_for(1).await;
    let paths: Vec<_> = seen.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(paths, ["/after"]);
    sidecar.stop().await;
}

#[actix_rt::test]
async fn a_header_section_over_64_kib_gets_431() {
    let upstream = RawUpstream::ok().await;
    let sidecar = Sidecar::start("{}");
    let target = upstream.url("");
    for size in [70 * 1024, 200 * 1024] {
        let big = "a".repeat(size);
        let mut conn = Conn::open(sidecar.addr).await;
        let raw = format!("GET / HTTP/1.1\r\nhost: x\r\ntarget: {target}\r\nx-big: {big}\r\n\r\n");
        // The sidecar may answer and close before reading everything; a failed write is fine.
        let _ = conn.stream_mut().write_all(raw.as_bytes()).await;
        let reply = conn.read(false).await;
        assert_eq!(reply.status, 431, "{size} bytes");
        if size < 128 * 1024 {
            // Refused by the sidecar itself: it says why and closes, since the rest was never read.
            assert_eq!(reply.header("x-sidecar-error"), Some("headers-too-large"));
            assert_eq!(reply.header("connection"), Some("close"), "{}", reply.head);
            assert!(conn.closed().await);
        }
    }
    // Just under the limit still passes.
    let fine = "a".repeat(60 * 1024);
    assert_eq!(
        get(sidecar.addr, "/", &[("target", &target), ("x-fine", &fine)])
            .await
            .status,
        200
    );
    assert_eq!(upstream.received().len(), 1);
    sidecar.stop().await;
}

#[actix_rt::test]
async fn an_https_upstream_with_an_untrusted_certificate_is_refused_with_502() {
    sidecar::install_crypto_provider();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let chain = vec![cert.cert.der().clone()];
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let handshakes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = handshakes.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            if acceptor.accept(stream).await.is_ok() {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });

    let sidecar = Sidecar::start("{}");
    let target = format!("https://localhost:{port}/secret");
    let reply = get(sidecar.addr, "/", &[("target", &target)]).await;
    assert_refused(&reply, 502, "upstream-tls-error");
    assert_eq!(handshakes.load(std::sync::atomic::Ordering::SeqCst), 0);
    sidecar.stop().await;
}

/// The whole response as bytes, read until the sidecar closes the connection (the request says `close`).
async fn raw_exchange(addr: std::net::SocketAddr, target: &str) -> Vec<u8> {
    let mut conn = Conn::open(addr).await;
    let raw = format!("GET / HTTP/1.1\r\nhost: x\r\ntarget: {target}\r\nconnection: close\r\n\r\n");
    conn.send(raw.as_bytes()).await;
    let mut buf = Vec::new();
    tokio::time::timeout(
        support::DEADLINE,
        tokio::io::AsyncReadExt::read_to_end(conn.stream_mut(), &mut buf),
    )
    .await
    .expect("the response ends, never hangs")
    .expect("read the response");
    buf
}

/// Issue 14 item 4: with `Content-Length: 3` and a chunked `hello`, the app got `content-length: 3` and `hel`
/// as a complete response; with a length larger than the body it got nothing. The chunked framing wins (RFC
/// 9112 §6.3) and the length is dropped before the response is passed on.
#[actix_rt::test]
async fn an_upstream_length_beside_chunked_framing_is_dropped_and_the_body_arrives_whole() {
    for length in ["3", "100"] {
        let upstream = RawUpstream::start(move |_| {
            response(
                200,
                &[("content-length", length), ("transfer-encoding", "chunked")],
                b"5\r\nhello\r\n0\r\n\r\n",
            )
        })
        .await;
        let sidecar = Sidecar::start("{}");
        let reply = get(sidecar.addr, "/", &[("target", &upstream.url(""))]).await;
        assert_eq!(reply.status, 200, "{}", reply.head);
        assert_eq!(reply.header("content-length"), None, "{}", reply.head);
        assert_eq!(
            reply.header("transfer-encoding"),
            Some("chunked"),
            "{}",
            reply.head
        );
        assert_eq!(reply.text(), "hello", "with content-length: {length}");

        // The same on the wire, read to the end: exactly one chunked `hello`, nothing more, nothing cut.
        let wire = raw_exchange(sidecar.addr, &upstream.url("")).await;
        let end = support::find(&wire, b"\r\n\r\n").expect("a head");
        assert_eq!(&wire[end + 4..], b"5\r\nhello\r\n0\r\n\r\n");
        sidecar.stop().await;
    }
}

/// Differing `Content-Length` values (two headers, or a list) cannot both describe the body: 502, with the
/// cause named, and no byte of the upstream's body passed on. Identical duplicates are refused the same way
/// by the codec (strict, as RFC 9112 §6.3 allows).
#[actix_rt::test]
async fn differing_upstream_content_lengths_are_a_502_never_a_guess() {
    let cases: [&[(&str, &str)]; 3] = [
        &[("content-length", "3"), ("content-length", "5")],
        &[("content-length", "3, 5")],
        &[("content-length", "5"), ("content-length", "5")],
    ];
    for headers in cases {
        let upstream = RawUpstream::start(move |_| response(200, headers, b"hello")).await;
        let sidecar = Sidecar::start("{}");
        let reply = get(sidecar.addr, "/", &[("target", &upstream.url(""))]).await;
        assert_refused(&reply, 502, "upstream-protocol-error");
        sidecar.stop().await;
    }
}
