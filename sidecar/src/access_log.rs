//! The access log: one JSON line per request on stdout, so the app needs no request logging of its own.
//!
//! Owns: the log's policy ([`AccessLogPolicy`], from the `access_log:` section), the record of one request
//! ([`Record`]) and the writer thread. Each worker writes its lines into its own bounded buffer and never
//! waits; the writer drains every buffer every 20 ms. When a buffer is full (the writer fell behind), lines are
//! dropped and counted (`sidecar_access_log_dropped_total`).
//! Called by the request path when a response body ends (see [`crate::telemetry::Timed`]).

use std::cell::Cell;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_http::Method;
use actix_http::uri::Authority;
use metrics::SharedString;

pub use crate::telemetry::names::ACCESS_LOG_DROPPED as DROPPED;

/// Unwritten bytes per worker; past this, new lines are dropped.
const SHARD_LIMIT: usize = 4 << 20;
/// How often the writer drains the workers' buffers: the most a line waits.
const DRAIN_EVERY: Duration = Duration::from_millis(20);

/// What the `access_log:` section says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AccessLogPolicy {
    pub enabled: bool,
    /// The share of requests logged, in [0, 1].
    pub sample: f64,
    /// Log the query string too (off by default: queries often carry tokens).
    pub query: bool,
}

/// Off unless asked for, as in Envoy and Linkerd: at full rate on 2 cores it costs ~5 % of requests/s in the
/// benchmark seat (sampling lowers that).
impl Default for AccessLogPolicy {
    fn default() -> Self {
        Self {
            enabled: false,
            sample: 1.0,
            query: false,
        }
    }
}

/// One request, as logged.
#[derive(Debug)]
pub struct Record {
    pub time: SystemTime,
    pub method: Method,
    pub service: SharedString,
    /// The request's path (and query, when `query` is set): kept as the request's URI, whose clone only bumps a
    /// reference count, and written when the line is.
    pub uri: actix_http::Uri,
    pub query: bool,
    pub status: u16,
    pub upstream: Option<Authority>,
    pub attempts: u32,
    pub duration: Duration,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub error: Option<&'static str>,
    /// The request's trace id, when traces are on.
    pub trace_id: Option<String>,
    /// Which listener served it: `egress` (the app's calls out) or `inbound` (mesh peers' calls in).
    pub direction: &'static str,
    /// The mesh peer's SPIFFE identity, for an inbound request.
    pub peer: Option<std::sync::Arc<str>>,
    /// How many shadow copies of the request were handed to the shadow actor.
    pub copies: u32,
    /// A fan-out request's tally (the `x-sidecar-fanout` header's value).
    pub fanout: Option<Box<str>>,
}

impl Record {
    /// The record of a request as it arrives at a listener (`direction`), before anything is known of its
    /// outcome; `query` is the policy's `access_log.query`.
    pub fn arriving(
        req: &actix_http::Request,
        direction: &'static str,
        service: SharedString,
        query: bool,
        trace_id: Option<String>,
        peer: Option<std::sync::Arc<str>>,
    ) -> Self {
        Self {
            time: SystemTime::now(),
            method: req.method().clone(),
            service,
            uri: req.uri().clone(),
            query,
            status: 0,
            upstream: None,
            attempts: 0,
            duration: Duration::ZERO,
            bytes_in: 0,
            bytes_out: 0,
            error: None,
            trace_id,
            direction,
            peer,
            copies: 0,
            fanout: None,
        }
    }

    /// Appends the record as one JSON line, without building an intermediate value.
    fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"time\":\"");
        write_rfc3339(out, self.time);
        out.extend_from_slice(b"\",\"method\":");
        json_string(out, self.method.as_str());
        out.extend_from_slice(b",\"service\":");
        json_string(out, &self.service);
        out.extend_from_slice(b",\"path\":");
        let path = match (self.query, self.uri.path_and_query()) {
            (true, Some(pq)) => pq.as_str(),
            _ => self.uri.path(),
        };
        json_string(out, path);
        out.extend_from_slice(b",\"status\":");
        push_int(out, u64::from(self.status), 1);
        out.extend_from_slice(b",\"upstream\":");
        match &self.upstream {
            Some(a) => json_string(out, a.as_str()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"attempts\":");
        push_int(out, u64::from(self.attempts), 1);
        let micros = u64::try_from(self.duration.as_micros()).unwrap_or(u64::MAX);
        out.extend_from_slice(b",\"duration_ms\":");
        push_int(out, micros / 1000, 1);
        out.push(b'.');
        push_int(out, micros % 1000, 3);
        out.extend_from_slice(b",\"bytes_in\":");
        push_int(out, self.bytes_in, 1);
        out.extend_from_slice(b",\"bytes_out\":");
        push_int(out, self.bytes_out, 1);
        out.extend_from_slice(b",\"error\":");
        match self.error {
            Some(e) => json_string(out, e),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"trace_id\":");
        match &self.trace_id {
            Some(t) => json_string(out, t),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"direction\":");
        json_string(out, self.direction);
        out.extend_from_slice(b",\"peer\":");
        match &self.peer {
            Some(p) => json_string(out, p),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"copies\":");
        push_int(out, u64::from(self.copies), 1);
        out.extend_from_slice(b",\"fanout\":");
        match &self.fanout {
            Some(f) => json_string(out, f),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b"}\n");
    }
}

/// A JSON string literal: quotes, backslashes and control characters escaped.
fn json_string(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    for &b in text.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0..=0x1f => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

/// One worker's buffer of serialized lines, drained by the writer.
type Shard = Mutex<Vec<u8>>;

/// Every worker's shard, for the writer to drain.
static SHARDS: Mutex<Vec<Arc<Shard>>> = Mutex::new(Vec::new());

thread_local! {
    static SHARD: Arc<Shard> = register();
}

fn register() -> Arc<Shard> {
    static WRITER: OnceLock<bool> = OnceLock::new();
    WRITER.get_or_init(|| {
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(write_lines)
            .map_err(|e| tracing::warn!(error = %e, "access log disabled: cannot start its writer"))
            .is_ok()
    });
    let shard = Arc::new(Mutex::new(Vec::with_capacity(64 * 1024)));
    SHARDS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(shard.clone());
    shard
}

/// Writes the record into this worker's buffer; the writer thread drains every buffer every few
/// milliseconds. No channel, no wake-up per request; a request never waits, and past [`SHARD_LIMIT`] unwritten
/// bytes a line is dropped and counted.
pub fn emit(record: Record) {
    SHARD.with(|shard| {
        let mut buf = shard.lock().unwrap_or_else(|p| p.into_inner());
        if buf.len() >= SHARD_LIMIT {
            drop(buf);
            metrics::counter!(DROPPED).increment(1);
            return;
        }
        record.write_json(&mut buf);
    });
}

fn write_lines() {
    let stdout = std::io::stdout();
    let mut spare = Vec::with_capacity(64 * 1024);
    loop {
        std::thread::sleep(DRAIN_EVERY);
        let shards: Vec<Arc<Shard>> = {
            let mut all = SHARDS.lock().unwrap_or_else(|p| p.into_inner());
            // A shard only the registry holds belongs to a worker that ended: drop it once written.
            let list = all.clone();
            all.retain(|s| {
                Arc::strong_count(s) > 2 || !s.lock().map(|b| b.is_empty()).unwrap_or(true)
            });
            list
        };
        let mut out = stdout.lock();
        for shard in shards {
            std::mem::swap(
                &mut *shard.lock().unwrap_or_else(|p| p.into_inner()),
                &mut spare,
            );
            if !spare.is_empty() {
                let _ignored_when_stdout_is_gone = out.write_all(&spare);
                spare.clear();
            }
        }
        let _ignored_when_stdout_is_gone = out.flush();
    }
}

/// Decides which requests are logged: a per-worker xorshift, no shared state.
#[derive(Debug)]
pub struct Sampler(Cell<u64>);

impl Default for Sampler {
    fn default() -> Self {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0x9E37_79B9_7F4A_7C15, |d| d.as_nanos() as u64)
            | 1;
        Self(Cell::new(seed))
    }
}

impl Sampler {
    pub fn sample(&self, share: f64) -> bool {
        if share >= 1.0 {
            return true;
        }
        let mut x = self.0.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0.set(x);
        #[allow(
            clippy::cast_precision_loss,
            reason = "53 bits of randomness are plenty for sampling"
        )]
        let draw = (x >> 11) as f64 / (1u64 << 53) as f64;
        draw < share
    }
}

/// Writes `2026-11-23T14:58:41.123Z`.
fn write_rfc3339(out: &mut Vec<u8>, time: SystemTime) {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    push_int(out, u64::try_from(year).unwrap_or(0), 4);
    out.push(b'-');
    push_int(out, u64::try_from(month).unwrap_or(0), 2);
    out.push(b'-');
    push_int(out, u64::try_from(day).unwrap_or(0), 2);
    out.push(b'T');
    push_int(out, rest / 3600, 2);
    out.push(b':');
    push_int(out, rest % 3600 / 60, 2);
    out.push(b':');
    push_int(out, rest % 60, 2);
    out.push(b'.');
    push_int(out, u64::from(since.subsec_millis()), 3);
    out.push(b'Z');
}

/// Writes `n` in decimal, zero-padded to `width` digits, without the formatting machinery (this runs once per
/// field per logged request).
fn push_int(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let start = i.min(digits.len().saturating_sub(width));
    out.extend_from_slice(&digits[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rfc3339(t: SystemTime) -> String {
        let mut out = Vec::new();
        write_rfc3339(&mut out, t);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn times_are_rfc3339_utc() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_445_921_123);
        assert_eq!(rfc3339(t), "2026-11-23T14:58:41.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn lines_are_json() {
        let record = Record {
            time: UNIX_EPOCH,
            method: Method::from_bytes(b"PURGE").unwrap(),
            service: SharedString::const_str("external"),
            uri: actix_http::Uri::from_static("/a%22b?token=x"),
            query: false,
            status: 200,
            upstream: None,
            attempts: 1,
            duration: Duration::from_micros(1500),
            bytes_in: 0,
            bytes_out: 5,
            error: Some("upstream-reset"),
            trace_id: None,
            direction: "inbound",
            peer: Some("spiffe://mesh.test/service/pay\"ments".into()),
            copies: 2,
            fanout: Some("ok=2,failed=1,timeout=0".into()),
        };
        let mut line = Vec::new();
        record.write_json(&mut line);
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(value["path"], "/a%22b", "no query unless asked for");
        assert_eq!(value["method"], "PURGE");
        assert_eq!(value["duration_ms"], 1.5);
        assert!(value["upstream"].is_null());
        assert_eq!(value["direction"], "inbound");
        assert_eq!(value["peer"], "spiffe://mesh.test/service/pay\"ments");
        assert_eq!(value["copies"], 2);
        assert_eq!(value["fanout"], "ok=2,failed=1,timeout=0");
        assert!(line.ends_with(b"}\n"));
        let with_query = Record {
            query: true,
            duration: Duration::from_micros(2_000_007),
            ..record
        };
        let mut line = Vec::new();
        with_query.write_json(&mut line);
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(value["path"], "/a%22b?token=x");
        assert_eq!(value["duration_ms"], 2000.007);
        assert!(value["trace_id"].is_null());
    }

    #[test]
    fn sampling_keeps_about_the_share_asked() {
        let s = Sampler::default();
        let kept = (0..10_000).filter(|_| s.sample(0.25)).count();
        assert!((2_000..3_000).contains(&kept), "{kept}");
        assert!((0..100).all(|_| s.sample(1.0)));
        assert!((0..100).all(|_| !s.sample(0.0)));
    }
}
