//! The app connection's lifecycle, tried with raw sockets as a careless or hostile client would: nothing sent
//! after a request that ends the connection is served, and every request head on a connection, not only the
//! first, must arrive within `listeners.head_timeout`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

mod support;

use std::time::Duration;

use support::{Conn, RawUpstream, Sidecar};
use tokio::io::AsyncWriteExt;

/// Sends `raw` (a first request that ends the connection, then more) in one write; the first is answered,
/// the connection closes, and the upstream never sees anything after the first.
async fn only_the_first_is_served(raw: String, upstream: &RawUpstream, sidecar: &Sidecar) {
    let mut conn = Conn::open(sidecar.addr).await;
    conn.send(raw.as_bytes()).await;
    let first = conn.read(false).await;
    assert_eq!(first.status, 200, "{}", first.head);
    assert!(
        conn.closed().await,
        "the connection stayed open after a request that ended it"
    );
    // Queued requests would have been served before the close: what the upstream has now is final.
    let paths: Vec<String> = upstream
        .received()
        .iter()
        .map(|r| r.head.lines().next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        paths,
        ["GET /first HTTP/1.1"],
        "a request sent after the connection's last one was processed"
    );
}

#[actix_rt::test]
async fn a_request_pipelined_after_connection_close_never_reaches_the_upstream() {
    let upstream = RawUpstream::ok().await;
    let sidecar = Sidecar::start(NO_POLICY);
    let target = upstream.url("");
    let raw = format!(
        "GET /first HTTP/1.1\r\nhost: x\r\ntarget: {target}\r\nconnection: close\r\n\r\n\
         GET /second HTTP/1.1\r\nhost: x\r\ntarget: {target}\r\n\r\n"
    );
    only_the_first_is_served(raw, &upstream, &sidecar).await;
    sidecar.stop().await;
}

#[actix_rt::test]
async fn a_request_pipelined_after_an_http_1_0_request_without_keep_alive_never_reaches_the_upstream()
 {
    let upstream = RawUpstream::ok().await;
    let sidecar = Sidecar::start(NO_POLICY);
    let target = upstream.url("");
    let raw = format!(
        "GET /first HTTP/1.0\r\nhost: x\r\ntarget: {target}\r\n\r\n\
         GET /second HTTP/1.0\r\nhost: x\r\ntarget: {target}\r\nconnection: keep-alive\r\n\r\n"
    );
    only_the_first_is_served(raw, &upstream, &sidecar).await;
    sidecar.stop().await;
}

#[actix_rt::test]
async fn a_request_hidden_after_the_body_of_a_closing_request_never_reaches_the_upstream() {
    let upstream = RawUpstream::ok().await;
    let sidecar = Sidecar::start(NO_POLICY);
    let target = upstream.url("");
    let raw = format!(
        "POST /first HTTP/1.1\r\nhost: x\r\ntarget: {target}\r\nconnection: close\r\ncontent-length: 5\r\n\r\nhello\
         GET /second HTTP/1.1\r\nhost: x\r\ntarget: {target}\r\n\r\n"
    );
    let mut conn = Conn::open(sidecar.addr).await;
    conn.send(raw.as_bytes()).await;
    assert_eq!(conn.read(false).await.status, 200);
    assert!(conn.closed().await);
    let received = upstream.received();
    assert_eq!(received.len(), 1, "{received:?}");
    assert!(received[0].head.starts_with("POST /first "));
    assert_eq!(received[0].body, b"hello");
    sidecar.stop().await;
}

const NO_POLICY: &str = "{}\n";

const HEAD_TIMEOUT: &str = "listeners:\n  head_timeout: 200ms\n";

/// Far more than the head timeout, far less than the keep-alive (120 s) that used to be the only limit.
const NOTICE: Duration = Duration::from_secs(3);

/// One request answered on `conn`, which stays open.
async fn first_request(conn: &mut Conn, upstream: &RawUpstream) {
    conn.send(
        format!(
            "GET /first HTTP/1.1\r\nhost: x\r\ntarget: {}\r\n\r\n",
            upstream.url("")
        )
        .as_bytes(),
    )
    .await;
    let reply = conn.read(false).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("connection"), None, "{}", reply.head);
}

/// The sidecar answers 408 and closes, soon after the head timeout (actix counts deadlines from a clock that
/// ticks every 500 ms, so "soon" is all a test can say of a 200 ms timeout).
async fn timed_out(conn: &mut Conn) {
    let reply = tokio::time::timeout(NOTICE, conn.read(false))
        .await
        .expect("the slow head on a reused connection was never timed out");
    assert_eq!(reply.status, 408, "{}", reply.head);
    assert!(conn.closed().await);
}

#[actix_rt::test]
async fn a_second_request_head_trickled_on_a_kept_alive_connection_is_timed_out() {
    let upstream = RawUpstream::ok().await;
    let sidecar = Sidecar::start(HEAD_TIMEOUT);
    let mut conn = Conn::open(sidecar.addr).await;
    first_request(&mut conn, &upstream).await;

    // The attacker's pace: one byte every 20 ms, for longer than the test waits.
    let (mut read, mut write) = conn.stream_mut().split();
    let trickle = async {
        for byte in b"GET /second HTTP/1.1\r\nhost: x\r\nx-padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n" {
            if write.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let answer = async {
        let mut buf = Vec::new();
        tokio::time::timeout(NOTICE, async {
            use tokio::io::AsyncReadExt;
            let mut chunk = [0u8; 1024];
            loop {
                match read.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .expect("the trickled head on a reused connection was never timed out");
        buf
    };
    let ((), answer) = tokio::join!(
        async {
            tokio::select! {
                () = trickle => {}
                () = tokio::time::sleep(NOTICE) => {}
            }
        },
        answer
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert_eq!(upstream.received().len(), 1);
    sidecar.stop().await;
}

#[actix_rt::test]
async fn a_partial_second_head_followed_by_silence_is_timed_out() {
    let upstream = RawUpstream::ok().await;
    let sidecar = Sidecar::start(HEAD_TIMEOUT);
    let mut conn = Conn::open(sidecar.addr).await;
    // The first request and the start of the second in one write: the start waits in the sidecar's buffer.
    conn.send(
        format!(
            "GET /first HTTP/1.1\r\nhost: x\r\ntarget: {}\r\n\r\nGET /second HTTP/1.1\r\nhost: x\r\n",
            upstream.url("")
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(conn.read(false).await.status, 200);
    timed_out(&mut conn).await;
    assert_eq!(upstream.received().len(), 1);
    sidecar.stop().await;
}

#[actix_rt::test]
async fn a_partial_second_head_sent_after_the_first_response_is_timed_out() {
    let upstream = RawUpstream::ok().await;
    let sidecar = Sidecar::start(HEAD_TIMEOUT);
    let mut conn = Conn::open(sidecar.addr).await;
    first_request(&mut conn, &upstream).await;
    conn.send(b"GET /second HTTP/1.1\r\nhost: x\r\n").await;
    timed_out(&mut conn).await;
    sidecar.stop().await;
}

#[actix_rt::test]
async fn an_idle_kept_alive_connection_is_not_held_to_the_head_timeout() {
    let upstream = RawUpstream::ok().await;
    let sidecar = Sidecar::start(HEAD_TIMEOUT);
    let mut conn = Conn::open(sidecar.addr).await;
    first_request(&mut conn, &upstream).await;
    // Idle for twice the head timeout: that is keep-alive's business (120 s), not the head's.
    tokio::time::sleep(Duration::from_millis(400)).await;
    first_request(&mut conn, &upstream).await;
    sidecar.stop().await;
}
