//! Test harness: the real sidecar in-process on a pre-bound port-0 listener, fake upstreams on port 0 that
//! record byte for byte what reached them, and a raw HTTP/1.1 client that shows exactly what came back.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

pub mod mesh;
pub mod process;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sidecar::clock::Clock;
use sidecar::control::store::PolicySource;
use sidecar::policy::Policy;
use sidecar::server::{self, RunOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Every wait in these tests is bounded by this, so a broken proxy fails a test instead of hanging it.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// The sidecar under test, running in this process.
pub struct Sidecar {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The mesh inbound listener, when the policy has one.
    pub inbound: Option<SocketAddr>,
    running: server::Running,
}

impl Sidecar {
    /// Starts the sidecar with a policy given as YAML.
    pub fn start(policy_yaml: &str) -> Self {
        Self::start_on_clock(policy_yaml, &Clock::system())
    }

    /// Starts the sidecar with a policy given as YAML, its breakers, budgets and rate limits reading `clock`
    /// (a manual one the story advances instead of sleeping).
    pub fn start_on_clock(policy_yaml: &str, clock: &Clock) -> Self {
        let policy = Policy::from_yaml("test policy", policy_yaml).expect("valid test policy");
        let options = RunOptions {
            clock: clock.clone(),
            ..RunOptions::default()
        };
        Self::start_with(PolicySource::default(), policy, options)
    }

    /// Starts the sidecar on a policy file or directory, as the binary would.
    pub fn start_source(source: PolicySource) -> Self {
        let policy = source.load().expect("valid test policy");
        Self::start_with(source, policy, RunOptions::default())
    }

    /// Starts the sidecar on a policy file or directory, reloaded only by `POST /admin/reload`.
    pub fn start_path(path: &std::path::Path) -> Self {
        Self::start_source(PolicySource {
            policy: Some(path.to_path_buf()),
            ..PolicySource::default()
        })
    }

    /// Starts the sidecar on a policy file or directory that it watches, as the binary does.
    pub fn start_watching(path: &std::path::Path) -> Self {
        Self::start_source(PolicySource {
            policy: Some(path.to_path_buf()),
            watch: true,
            ..PolicySource::default()
        })
    }

    fn start_with(mut source: PolicySource, mut policy: Policy, options: RunOptions) -> Self {
        let egress = StdListener::bind("127.0.0.1:0").expect("bind port 0");
        let admin = StdListener::bind("127.0.0.1:0").expect("bind port 0");
        // Pin the listeners to these sockets, as the command line pins them, so reloads never move them.
        let (e, a) = (
            egress.local_addr().expect("addr"),
            admin.local_addr().expect("addr"),
        );
        source.overrides.egress_ip = Some(e.ip());
        source.overrides.egress_port = Some(e.port());
        source.overrides.admin = Some(a);
        policy.listeners.egress = e;
        policy.listeners.admin = a;
        // The access log writes to the test process's stdout; its own test runs the binary.
        source.overrides.access_log = Some(false);
        policy.access_log.enabled = false;
        Self::start_on(source, policy, egress, admin, options)
    }

    /// Starts on given sockets with nothing pinned: the policy files name these addresses and may move them
    /// (through `POST /admin/reload`; the files are not watched).
    pub fn start_exact(path: &std::path::Path, egress: StdListener, admin: StdListener) -> Self {
        let mut source = PolicySource {
            policy: Some(path.to_path_buf()),
            ..PolicySource::default()
        };
        source.overrides.access_log = Some(false);
        let policy = source.load().expect("valid test policy");
        Self::start_on(source, policy, egress, admin, RunOptions::default())
    }

    fn start_on(
        source: PolicySource,
        policy: Policy,
        egress: StdListener,
        admin: StdListener,
        options: RunOptions,
    ) -> Self {
        let listeners = server::Listeners {
            egress,
            admin: Some(admin),
        };
        let running = server::start(source, policy, listeners, options).expect("sidecar starts");
        let addr = running.egress;
        let admin = running.admin.expect("admin listener");
        Self {
            addr,
            admin,
            inbound: running.inbound,
            running,
        }
    }

    pub fn policy(&self) -> &sidecar::control::store::PolicyHandle {
        &self.running.policy
    }

    pub async fn stop(self) {
        self.running.stop(false).await;
    }
}

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The raw head, request line and headers, exactly as it arrived.
    pub head: String,
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Which accepted connection (0, 1, ...) carried it.
    pub connection: usize,
}

impl Received {
    /// Every value of a header, in order (name case-insensitive).
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.all(name).first().copied()
    }
}

type Responder = dyn Fn(&Received) -> Vec<u8> + Send + Sync;

/// A fake upstream on port 0 that answers every request with the bytes its responder returns.
pub struct RawUpstream {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    connections: Arc<AtomicUsize>,
    notify: Arc<tokio::sync::Notify>,
}

impl RawUpstream {
    /// Answers with the responder's bytes, keeping connections alive unless the response says `close`.
    pub async fn start(responder: impl Fn(&Received) -> Vec<u8> + Send + Sync + 'static) -> Self {
        Self::start_inner(Some(Arc::new(responder))).await
    }

    /// Answers `200 OK` with a small body.
    pub async fn ok() -> Self {
        Self::start(|_| response(200, &[("content-length", "2")], b"ok")).await
    }

    /// Reads requests and never answers.
    pub async fn silent() -> Self {
        Self::start_inner(None).await
    }

    /// Answers `200 OK` on a given address, or `None` when it cannot be bound.
    pub async fn ok_on(addr: &str) -> Option<Self> {
        let listener = TcpListener::bind(addr).await.ok()?;
        let responder: Arc<Responder> =
            Arc::new(|_: &Received| response(200, &[("content-length", "2")], b"ok"));
        Some(Self::serve_on(listener, Some(responder)))
    }

    async fn start_inner(responder: Option<Arc<Responder>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::serve_on(listener, responder)
    }

    fn serve_on(listener: TcpListener, responder: Option<Arc<Responder>>) -> Self {
        let addr = listener.local_addr().expect("addr");
        let received = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let notify = Arc::new(tokio::sync::Notify::new());
        let (r, c, n) = (received.clone(), connections.clone(), notify.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let id = c.fetch_add(1, Ordering::SeqCst);
                let (r, n, responder) = (r.clone(), n.clone(), responder.clone());
                tokio::spawn(async move { serve(stream, id, r, n, responder).await });
            }
        });
        Self {
            addr,
            received,
            connections,
            notify,
        }
    }

    /// `http://127.0.0.1:PORT` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }

    /// Waits until `n` requests have arrived and returns them.
    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
        tokio::time::timeout(DEADLINE, async {
            loop {
                let notified = self.notify.notified();
                let now = self.received();
                if now.len() >= n {
                    return now;
                }
                notified.await;
            }
        })
        .await
        .expect("upstream received the requests in time")
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn serve(
    mut stream: TcpStream,
    id: usize,
    received: Arc<Mutex<Vec<Received>>>,
    notify: Arc<tokio::sync::Notify>,
    responder: Option<Arc<Responder>>,
) {
    let mut buf = Vec::new();
    loop {
        let Some(req) = read_request(&mut stream, &mut buf, id).await else {
            return;
        };
        received.lock().expect("lock").push(req.clone());
        notify.notify_waiters();
        let Some(responder) = &responder else {
            continue;
        };
        let bytes = responder(&req);
        if stream.write_all(&bytes).await.is_err() {
            return;
        }
        let head_end = find(&bytes, b"\r\n\r\n").unwrap_or(bytes.len());
        if String::from_utf8_lossy(&bytes[..head_end])
            .to_ascii_lowercase()
            .contains("connection: close")
        {
            return;
        }
    }
}

async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>, id: usize) -> Option<Received> {
    let head_len = read_head(stream, buf).await?;
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut parsed = httparse::Request::new(&mut headers);
    parsed.parse(&buf[..head_len]).ok()?;
    let method = parsed.method?.to_string();
    let target = parsed.path?.to_string();
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    buf.drain(..head_len);
    let body = read_body(stream, buf, &headers).await?;
    Some(Received {
        head,
        method,
        target,
        headers,
        body,
        connection: id,
    })
}

/// Reads until a full head is buffered; returns its length including the blank line.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            return Some(i + 4);
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads a body framed by `content-length` or `transfer-encoding: chunked` (none means empty).
async fn read_body(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    headers: &[(String, String)],
) -> Option<Vec<u8>> {
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(buf, b"\r\n") {
                    break i;
                }
                fill(stream, buf).await?;
            };
            let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            buf.drain(..line_end + 2);
            if size == 0 {
                // Trailers, then the final blank line.
                loop {
                    if let Some(i) = find(buf, b"\r\n") {
                        let empty = i == 0;
                        buf.drain(..i + 2);
                        if empty {
                            return Some(body);
                        }
                    } else {
                        fill(stream, buf).await?;
                    }
                }
            }
            while buf.len() < size + 2 {
                fill(stream, buf).await?;
            }
            body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
        }
    }
    let len: usize = get("content-length").map_or(Some(0), |v| v.trim().parse().ok())?;
    while buf.len() < len {
        fill(stream, buf).await?;
    }
    Some(buf.drain(..len).collect())
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 64 * 1024];
    let n = stream.read(&mut chunk).await.ok()?;
    (n > 0).then(|| buf.extend_from_slice(&chunk[..n]))
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Builds a raw HTTP/1.1 response.
pub fn response(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status)).into_bytes();
    for (k, v) in headers {
        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// A response as the client received it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The raw head as received.
    pub head: String,
}

impl Reply {
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.all(name).first().copied()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw HTTP/1.1 client connection.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr)
            .await
            .expect("connect to the sidecar");
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn stream_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write request");
    }

    /// Reads one response; `head_request` says the request was HEAD (no body follows).
    pub async fn read(&mut self, head_request: bool) -> Reply {
        tokio::time::timeout(DEADLINE, Box::pin(self.read_inner(head_request)))
            .await
            .expect("response in time")
            .expect("a complete response")
    }

    async fn read_inner(&mut self, head_request: bool) -> Option<Reply> {
        let head_len = read_head(&mut self.stream, &mut self.buf).await?;
        let head = String::from_utf8_lossy(&self.buf[..head_len]).into_owned();
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut parsed = httparse::Response::new(&mut headers);
        parsed.parse(&self.buf[..head_len]).ok()?;
        let status = parsed.code?;
        let headers: Vec<(String, String)> = parsed
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        self.buf.drain(..head_len);
        let no_body =
            head_request || status == 204 || status == 304 || (100..200).contains(&status);
        let body = if no_body {
            Vec::new()
        } else if headers.iter().any(|(k, _)| {
            k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding")
        }) {
            read_body(&mut self.stream, &mut self.buf, &headers).await?
        } else {
            // Close-delimited.
            let mut rest = std::mem::take(&mut self.buf);
            self.stream.read_to_end(&mut rest).await.ok()?;
            rest
        };
        Some(Reply {
            status,
            headers,
            body,
            head,
        })
    }

    /// True when the server has closed the connection (reads EOF) within the deadline.
    pub async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        matches!(
            tokio::time::timeout(DEADLINE, self.stream.read_to_end(&mut rest)).await,
            Ok(Ok(_))
        )
    }
}

/// One request on a fresh connection.
pub async fn request(addr: SocketAddr, raw: &str) -> Reply {
    // Boxed so that a test awaiting many requests keeps a small future (debug builds overflow the stack).
    Box::pin(async move {
        let mut conn = Conn::open(addr).await;
        conn.send(raw.as_bytes()).await;
        conn.read(raw.starts_with("HEAD ")).await
    })
    .await
}

/// `GET path` with the given extra header lines.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut raw = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n");
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    raw.push_str("\r\n");
    request(addr, &raw).await
}

/// An upstream that takes one request and answers `200 slow` only when told to: it returns its address, a
/// signal that the request arrived, and the trigger that releases the answer.
pub async fn held_upstream() -> (
    SocketAddr,
    Arc<tokio::sync::Notify>,
    Arc<tokio::sync::Notify>,
) {
    let (arrived, release) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (a, r) = (arrived.clone(), release.clone());
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        a.notify_one();
        r.notified().await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow")
            .await;
    });
    (addr, arrived, release)
}

/// Waits until `condition` holds, checking every 20 ms, and fails the test naming `what` when it has not held
/// within [`DEADLINE`]. The one way these tests wait for something to become true.
pub async fn eventually<F, Fut>(what: &str, condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_within(what, DEADLINE, condition).await;
}

/// [`eventually`] with a bound of its own, for a wait on something slower than the sidecar (a Prometheus
/// server starting and scraping).
pub async fn eventually_within<F, Fut>(what: &str, limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
