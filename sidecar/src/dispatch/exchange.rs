//! The per-request context every phase reads and writes: when the request arrived, its metric labels, what its
//! response body holds until it ends (the concurrency slot, the server span), its access-log record and its
//! in-flight count. Made when the request arrives ([`Exchange::arriving`]); turned into the app's response
//! by [`super::respond::finish`]. Both listeners use it.

use std::time::Instant;

use actix_http::Request;
use metrics::SharedString;
use opentelemetry::Context;

use crate::access_log::{AccessLogPolicy, Record, Sampler};
use crate::telemetry::{BytesIn, Hold, InFlight, Instruments, RequestLabels, method_label};
use crate::traces;

/// One request's context.
#[derive(Debug)]
pub struct Exchange {
    pub started: Instant,
    pub labels: RequestLabels,
    /// Held until the response body ends: the concurrency slot and the server span.
    pub hold: Hold,
    /// The access-log line, when the request is logged (enabled and sampled).
    pub record: Option<Record>,
    pub(super) in_flight: InFlight,
}

/// Where a request came in, for its span, access-log line and labels.
#[derive(Debug, Clone, Copy)]
pub struct Listener {
    /// `egress` or `inbound`: the access log's `direction`.
    pub direction: &'static str,
    /// The server span's `url.scheme`.
    pub scheme: &'static str,
    /// The `service` label until routing names one.
    pub service: &'static str,
}

impl Exchange {
    /// The context of a request that just arrived: its server span (when sampled), its in-flight count and,
    /// when the access log is on and samples it, its record. `peer` is the mesh peer's identity.
    pub fn arriving(
        req: &Request,
        listener: Listener,
        log: AccessLogPolicy,
        instruments: &Instruments,
        sampler: &Sampler,
        peer: Option<std::sync::Arc<str>>,
    ) -> Self {
        let started = Instant::now();
        let trace = traces::get().and_then(|t| traces::server_span(t, req, listener.scheme));
        let in_flight = instruments.in_flight();
        let service = SharedString::const_str(listener.service);
        let record = (log.enabled && sampler.sample(log.sample)).then(|| {
            Record::arriving(
                req,
                listener.direction,
                service.clone(),
                log.query,
                trace.as_ref().and_then(traces::trace_id),
                peer,
            )
        });
        Self {
            started,
            labels: RequestLabels {
                service,
                method: method_label(req.method()),
                upstream: None,
                attempts: 0,
                bytes_in: BytesIn::None,
            },
            hold: Hold {
                permit: None,
                trace,
            },
            record,
            in_flight,
        }
    }

    /// The server span, when the request is traced.
    pub fn trace(&self) -> Option<&Context> {
        self.hold.trace.as_ref()
    }

    /// What the attempts of this request record on.
    pub fn seen(&mut self) -> Seen<'_> {
        Seen {
            labels: &mut self.labels,
            trace: self.hold.trace.as_ref(),
        }
    }
}

/// What attempts record on: the labels of their request's metrics, and the span their spans are children of
/// (the server span, or a fan-out target's).
#[derive(Debug)]
pub struct Seen<'a> {
    pub labels: &'a mut RequestLabels,
    pub trace: Option<&'a Context>,
}
