//! Bodies stream in both directions with back pressure: a gibibyte passes each way while the sidecar (a real
//! child process, measured alone) stays under 64 MiB, and a stalled reader stalls the writer instead of
//! filling the sidecar's memory.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use support::process::{SidecarProcess, sidecar_bin};
use support::{DEADLINE, find};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const RSS_LIMIT: u64 = 64 * MIB;
/// What may sit between a stalled reader and its writer: socket buffers on both hops plus the sidecar's own.
const IN_FLIGHT_LIMIT: u64 = 48 * MIB;

fn start_sidecar() -> SidecarProcess {
    let mut cmd = sidecar_bin();
    cmd.env_remove("SIDECAR_CONFIG")
        .env_remove("SIDECAR_POLICY");
    SidecarProcess::spawn(cmd)
}

/// Polls `counter` until it stops moving (two equal reads 200 ms apart), within the deadline.
async fn settled(counter: &AtomicU64) -> u64 {
    tokio::time::timeout(DEADLINE, async {
        let mut last = counter.load(Ordering::SeqCst);
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = counter.load(Ordering::SeqCst);
            if now == last {
                return now;
            }
            last = now;
        }
    })
    .await
    .expect("the writer never stalled: nothing is holding it back")
}

async fn read_head(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return (String::from_utf8_lossy(&buf).into_owned(), rest);
        }
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before a response head");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Connects to the sidecar and sends the head of an upload (`POST /up`) to `upstream`, framed by `framing`
/// (a `content-length` or `transfer-encoding` header line).
async fn start_upload(sidecar: SocketAddr, upstream: SocketAddr, framing: &str) -> TcpStream {
    let mut c = TcpStream::connect(sidecar).await.unwrap();
    c.write_all(
        format!("POST /up HTTP/1.1\r\nhost: x\r\ntarget: http://{upstream}\r\n{framing}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    c
}

/// The upstream's side of an upload: accepts one connection and reads the request head, which must carry
/// `framing`; returns the connection and the body bytes read with the head.
async fn accept_upload(listener: TcpListener, framing: &str) -> (TcpStream, Vec<u8>) {
    let (mut s, _) = listener.accept().await.unwrap();
    let (head, rest) = read_head(&mut s).await;
    assert!(head.to_ascii_lowercase().contains(framing), "{head}");
    (s, rest)
}

/// The app's upload stalls behind the stalled upstream (with `sent` bytes written, at most
/// [`IN_FLIGHT_LIMIT`] past the upstream's 1 MiB), then, once the upstream goes on, finishes with a 200
/// within `within`. Returns where it stalled.
async fn stalls_then_finishes(
    sent: &AtomicU64,
    go_on: &tokio::sync::Notify,
    client: tokio::task::JoinHandle<(String, Vec<u8>)>,
    within: Duration,
) -> u64 {
    let stalled_at = settled(sent).await;
    assert!(
        stalled_at < MIB + IN_FLIGHT_LIMIT,
        "the app wrote {} MiB while the upstream had read 1 MiB",
        stalled_at / MIB
    );
    go_on.notify_one();
    let (head, _) = tokio::time::timeout(within, client)
        .await
        .expect("the upload finished in time")
        .unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    stalled_at
}

#[actix_rt::test]
async fn a_gibibyte_download_streams_through_a_stalled_reader_in_bounded_memory() {
    // The upstream writes 1 GiB as fast as it is allowed to, counting what it managed to write.
    let written = Arc::new(AtomicU64::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let counter = written.clone();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        read_head(&mut s).await;
        s.write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {GIB}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let block = vec![7u8; 256 * 1024];
        let mut left = GIB;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            s.write_all(&block[..n]).await.unwrap();
            counter.fetch_add(n as u64, Ordering::SeqCst);
            left -= n as u64;
        }
    });

    let sidecar = start_sidecar();
    let mut client = TcpStream::connect(sidecar.addr).await.unwrap();
    client
        .write_all(
            format!("GET /big HTTP/1.1\r\nhost: x\r\ntarget: http://{upstream}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let (head, rest) = read_head(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains(&format!("content-length: {GIB}")), "{head}");
    let mut received = rest.len() as u64;
    let mut buf = vec![0u8; 256 * 1024];
    while received < MIB {
        received += client.read(&mut buf).await.unwrap() as u64;
    }

    // The app stops reading: the upstream must be held back, not buffered for.
    let stalled_at = settled(&written).await;
    let read_at_stall = received;
    assert!(
        stalled_at - received < IN_FLIGHT_LIMIT,
        "{} MiB left the upstream while the app had read {} MiB",
        stalled_at / MIB,
        received / MIB
    );

    // The app reads again: everything arrives, nothing more, nothing less.
    let rest = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let n = client.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            received += n as u64;
            if received >= GIB {
                break;
            }
        }
    })
    .await;
    assert!(rest.is_ok(), "the download did not finish in time");
    assert_eq!(received, GIB);
    let peak = sidecar.peak_rss();
    eprintln!(
        "download: stalled with {} KiB in flight; sidecar peak RSS {} KiB",
        (stalled_at - read_at_stall) / 1024,
        peak / 1024
    );
    assert!(peak < RSS_LIMIT, "the sidecar peaked at {} MiB", peak / MIB);
}

#[actix_rt::test]
async fn a_gibibyte_chunked_upload_streams_to_a_stalled_upstream_in_bounded_memory() {
    // The upstream reads 1 MiB, then stops until told to go on, then counts the rest.
    let go_on = Arc::new(tokio::sync::Notify::new());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let resume = go_on.clone();
    let upstream_task = tokio::spawn(async move {
        let (mut s, rest) = accept_upload(listener, "transfer-encoding: chunked").await;
        let mut raw = rest.len() as u64;
        let mut buf = vec![0u8; 256 * 1024];
        while raw < MIB {
            raw += s.read(&mut buf).await.unwrap() as u64;
        }
        resume.notified().await;
        // Read chunked framing until the terminating chunk; count raw bytes.
        let mut tail = Vec::new();
        loop {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the upload ended early");
            raw += n as u64;
            tail.extend_from_slice(&buf[..n]);
            if tail.len() > 16 {
                tail.drain(..tail.len() - 16);
            }
            if tail.ends_with(b"\r\n0\r\n\r\n") {
                break;
            }
        }
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ndone")
            .await
            .unwrap();
        raw
    });

    let sidecar = start_sidecar();
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let addr = sidecar.addr;
    let client = tokio::spawn(async move {
        let mut c = start_upload(addr, upstream, "transfer-encoding: chunked").await;
        let chunk = 256 * 1024;
        let mut framed = format!("{chunk:x}\r\n").into_bytes();
        framed.extend(std::iter::repeat_n(b'u', chunk));
        framed.extend_from_slice(b"\r\n");
        for _ in 0..(GIB / chunk as u64) {
            c.write_all(&framed).await.unwrap();
            counter.fetch_add(chunk as u64, Ordering::SeqCst);
        }
        c.write_all(b"0\r\n\r\n").await.unwrap();
        let (head, body) = read_head(&mut c).await;
        (head, body)
    });

    let stalled_at = stalls_then_finishes(&sent, &go_on, client, Duration::from_secs(120)).await;
    let raw = upstream_task.await.unwrap();
    assert!(
        raw > GIB,
        "the upstream received {raw} bytes of framing and data"
    );
    let peak = sidecar.peak_rss();
    eprintln!(
        "upload: stalled with {} KiB in flight; sidecar peak RSS {} KiB",
        (stalled_at - MIB) / 1024,
        peak / 1024
    );
    assert!(peak < RSS_LIMIT, "the sidecar peaked at {} MiB", peak / MIB);
}

/// The byte at `offset` of the sized upload: a period (251) that no write size divides, so a dropped,
/// repeated or reordered piece shows.
fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8
}

#[actix_rt::test]
async fn a_sized_upload_arrives_byte_for_byte_and_a_stalled_upstream_holds_it_back() {
    // Writes of mixed sizes: small ones gather in the sidecar's write buffer, large ones go to the socket
    // from their own buffer. The upstream reads 1 MiB, stalls until told to go on, then checks every byte.
    const LEN: u64 = 64 * MIB + 12_345;
    let go_on = Arc::new(tokio::sync::Notify::new());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let resume = go_on.clone();
    let upstream_task = tokio::spawn(async move {
        let (mut s, rest) = accept_upload(listener, &format!("content-length: {LEN}")).await;
        let mut got = 0u64;
        let mut wrong = 0u64;
        let mut check = |bytes: &[u8], got: &mut u64| {
            for &b in bytes {
                wrong += u64::from(b != pattern(*got));
                *got += 1;
            }
        };
        check(&rest, &mut got);
        let mut buf = vec![0u8; 256 * 1024];
        let mut stalled = false;
        while got < LEN {
            if !stalled && got >= MIB {
                resume.notified().await;
                stalled = true;
            }
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the upload ended after {got} bytes");
            check(&buf[..n], &mut got);
        }
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ndone")
            .await
            .unwrap();
        (got, wrong)
    });

    let sidecar = start_sidecar();
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let addr = sidecar.addr;
    let client = tokio::spawn(async move {
        let mut c = start_upload(addr, upstream, &format!("content-length: {LEN}")).await;
        let mut offset = 0u64;
        for size in [1_000u64, 70_000, 3, 300_000, 9_000].into_iter().cycle() {
            let size = size.min(LEN - offset);
            let piece: Vec<u8> = (offset..offset + size).map(pattern).collect();
            c.write_all(&piece).await.unwrap();
            offset += size;
            counter.store(offset, Ordering::SeqCst);
            if offset == LEN {
                break;
            }
        }
        read_head(&mut c).await
    });

    stalls_then_finishes(&sent, &go_on, client, Duration::from_secs(60)).await;
    let (got, wrong) = upstream_task.await.unwrap();
    assert_eq!(got, LEN);
    assert_eq!(wrong, 0, "bytes arrived changed, out of order or twice");
    let peak = sidecar.peak_rss();
    assert!(peak < RSS_LIMIT, "the sidecar peaked at {} MiB", peak / MIB);
}

#[actix_rt::test]
async fn a_chunked_response_reaches_the_app_chunk_by_chunk() {
    let second = Arc::new(tokio::sync::Notify::new());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let go = second.clone();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        read_head(&mut s).await;
        s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            .await
            .unwrap();
        go.notified().await;
        s.write_all(b"6\r\nsecond\r\n0\r\n\r\n").await.unwrap();
    });

    let sidecar = support::Sidecar::start("{}");
    let mut client = TcpStream::connect(sidecar.addr).await.unwrap();
    client
        .write_all(
            format!("GET /s HTTP/1.1\r\nhost: x\r\ntarget: http://{upstream}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let (head, mut body) = read_head(&mut client).await;
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert!(
        !head.contains("content-type"),
        "invented content-type: {head}"
    );
    // The first chunk arrives while the upstream is still holding the second.
    let mut buf = [0u8; 1024];
    tokio::time::timeout(DEADLINE, async {
        while find(&body, b"first").is_none() {
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0);
            body.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the first chunk was held back until the body completed");
    second.notify_one();
    tokio::time::timeout(DEADLINE, async {
        while find(&body, b"0\r\n\r\n").is_none() {
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0);
            body.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the rest of the body arrived");
    assert!(find(&body, b"second").is_some());
    sidecar.stop().await;
}
