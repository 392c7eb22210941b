//! `sidecar health` and `sidecar pause`: the two small jobs a container needs from the one binary in a `FROM
//! scratch` image, where there is no shell, no curl and no `sleep`.
//!
//! Owns: one blocking HTTP/1.1 `GET` to the admin listener (`/healthz`, or `/readyz`), answered by its status
//! line alone, and holding a network namespace until told to stop. Does not own: what healthy and ready mean
//! (the admin listener's routes, [`crate::admin`]). Called by `main.rs`, from every `HEALTHCHECK` of
//! `compose/` and by the compose pod's namespace holder.
//!
//! The probe opens no TLS, resolves no name (the address is an IP:PORT) and sets up no tracing, so that a
//! health check every second costs the container next to nothing and cannot hang on DNS.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// What a probe found: the one line to print, and whether the listener answered 200.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub healthy: bool,
    pub line: String,
}

/// Asks `GET <path>` of the admin listener at `addr` and waits at most `timeout` for the whole answer.
pub fn probe(addr: SocketAddr, path: &str, timeout: Duration) -> Probe {
    let unhealthy = |why: String| Probe {
        healthy: false,
        line: format!("unhealthy: {addr}{path}: {why}"),
    };
    let deadline = Instant::now() + timeout;
    let mut stream = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => return unhealthy(e.to_string()),
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if let Err(e) = stream
        .set_write_timeout(Some(remaining(deadline)))
        .and_then(|()| stream.write_all(request.as_bytes()))
    {
        return unhealthy(e.to_string());
    }
    // The status line and headers are all that is read; the admin answers are a few bytes.
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let code = response.code.unwrap_or_default();
                return Probe {
                    healthy: code == 200,
                    line: format!(
                        "{}: {addr}{path} answered {code}",
                        if code == 200 { "healthy" } else { "unhealthy" }
                    ),
                };
            }
            Ok(httparse::Status::Partial) if buf.len() < 16 * 1024 => {}
            Ok(httparse::Status::Partial) => return unhealthy("an oversized answer".into()),
            Err(e) => return unhealthy(format!("not an HTTP answer ({e})")),
        }
        let left = remaining(deadline);
        if left.is_zero() {
            return unhealthy(format!("no answer within {timeout:?}"));
        }
        if let Err(e) = stream.set_read_timeout(Some(left)) {
            return unhealthy(e.to_string());
        }
        match stream.read(&mut chunk) {
            Ok(0) => return unhealthy("the connection closed before an answer".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return unhealthy(format!("no answer within {timeout:?}")),
            Err(e) => return unhealthy(e.to_string()),
        }
    }
}

/// At least a millisecond: a zero socket timeout means "block forever".
fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Holds the process (and so its network namespace) until SIGTERM or SIGINT, then returns: a compose "pod"
/// needs a namespace owner that never restarts, so that the app and its sidecar can each restart in it.
pub fn pause() -> std::io::Result<()> {
    actix_rt::System::new().block_on(async {
        use actix_rt::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn answer_once(reply: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let mut buf = [0u8; 1024];
                let _read = s.read(&mut buf);
                let _written = s.write_all(reply);
            }
        });
        addr
    }

    #[test]
    fn a_200_is_healthy() {
        let addr = answer_once(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n");
        let p = probe(addr, "/healthz", Duration::from_secs(2));
        assert!(p.healthy, "{p:?}");
        assert!(p.line.starts_with("healthy: "), "{}", p.line);
    }

    #[test]
    fn a_503_is_unhealthy() {
        let addr = answer_once(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n");
        let p = probe(addr, "/readyz", Duration::from_secs(2));
        assert!(!p.healthy);
        assert!(p.line.contains("answered 503"), "{}", p.line);
    }

    #[test]
    fn nothing_listening_is_unhealthy_at_once() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("addr");
        let p = probe(addr, "/healthz", Duration::from_secs(2));
        assert!(!p.healthy);
        assert!(p.line.starts_with("unhealthy: "), "{}", p.line);
    }

    #[test]
    fn a_listener_that_never_answers_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let started = Instant::now();
        let p = probe(addr, "/healthz", Duration::from_millis(200));
        assert!(!p.healthy);
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(p.line.contains("no answer"), "{}", p.line);
        drop(listener);
    }
}
