//! Trace stories: the real binary exporting OTLP over HTTP to a receiver on loopback, whose batches are
//! decoded with the OpenTelemetry protobuf definitions.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly on purpose"
)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use support::process::{SidecarProcess, sidecar_bin};
use support::{RawUpstream, get, response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// An OTLP/HTTP receiver: answers every POST 200 and keeps each decoded span with its resource's service name.
type Spans = Arc<Mutex<Vec<(String, Span)>>>;

async fn receiver() -> (std::net::SocketAddr, Spans, Arc<Notify>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spans = Arc::new(Mutex::new(Vec::new()));
    let arrived = Arc::new(Notify::new());
    let (kept, notify) = (spans.clone(), arrived.clone());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (kept, notify) = (kept.clone(), notify.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                let (head_end, length) = loop {
                    let n = stream.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(end) = support::find(&buf, b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        assert!(head.starts_with("post /v1/traces "), "{head}");
                        assert!(
                            head.contains("content-type: application/x-protobuf"),
                            "{head}"
                        );
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap();
                        break (end + 4, length);
                    }
                };
                while buf.len() < head_end + length {
                    let n = stream.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let batch = ExportTraceServiceRequest::decode(&buf[head_end..head_end + length])
                    .expect("an OTLP protobuf batch");
                for resource in batch.resource_spans {
                    let service = resource
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|kv| kv.key == "service.name")
                        .and_then(|kv| kv.value.as_ref())
                        .map(|v| format!("{:?}", v.value))
                        .unwrap_or_default();
                    for scope in resource.scope_spans {
                        for span in scope.spans {
                            kept.lock().unwrap().push((service.clone(), span));
                        }
                    }
                }
                notify.notify_one();
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await;
            });
        }
    });
    (addr, spans, arrived)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[actix_rt::test]
async fn a_request_and_its_retry_reach_the_collector_as_linked_spans() {
    let (collector, spans, arrived) = receiver().await;
    // The first attempt fails with 503, the retry succeeds.
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let upstream = RawUpstream::start(move |_| {
        if c.fetch_add(1, Ordering::SeqCst) == 0 {
            response(503, &[("content-length", "0")], b"")
        } else {
            response(200, &[("content-length", "2")], b"ok")
        }
    })
    .await;
    let mut cmd = sidecar_bin();
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}"))
        .env("OTEL_SERVICE_NAME", "checkout")
        .env("OTEL_TRACES_SAMPLER", "parentbased_always_on")
        .env_remove("SIDECAR_POLICY")
        .env_remove("SIDECAR_CONFIG")
        .current_dir(std::env::temp_dir());
    let sidecar = SidecarProcess::spawn(cmd);

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let reply = get(
        sidecar.addr,
        "/orders/7",
        &[
            ("target", &upstream.url("")),
            ("traceparent", &format!("00-{trace_id}-{caller_span}-01")),
        ],
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-sidecar-attempts"), Some("2"));

    // The upstream saw the trace continued, with each attempt's own span as parent.
    let seen = upstream.wait_for(2).await;
    let parents: Vec<String> = seen
        .iter()
        .map(|r| {
            let tp = r.header("traceparent").expect("traceparent sent upstream");
            assert!(tp.starts_with(&format!("00-{trace_id}-")), "{tp}");
            tp.split('-').nth(2).unwrap().to_string()
        })
        .collect();
    assert_ne!(parents[0], parents[1], "one span per attempt");

    // The batch reaches the collector within the export delay.
    tokio::time::timeout(support::DEADLINE, async {
        while spans.lock().unwrap().len() < 3 {
            arrived.notified().await;
        }
    })
    .await
    .expect("the spans reached the collector");
    let spans = spans.lock().unwrap().clone();
    let server: Vec<&Span> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.kind == SpanKind::Server as i32)
        .collect();
    let clients: Vec<&Span> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.kind == SpanKind::Client as i32)
        .collect();
    assert_eq!(server.len(), 1);
    assert_eq!(clients.len(), 2);
    let server = server[0];
    assert_eq!(hex(&server.trace_id), trace_id);
    assert_eq!(hex(&server.parent_span_id), caller_span);
    for client in &clients {
        assert_eq!(hex(&client.trace_id), trace_id);
        assert_eq!(hex(&client.parent_span_id), hex(&server.span_id));
        assert!(parents.contains(&hex(&client.span_id)));
    }
    let services: Vec<&String> = spans.iter().map(|(s, _)| s).collect();
    assert!(
        services.iter().all(|s| s.contains("checkout")),
        "{services:?}"
    );
    let retry = clients
        .iter()
        .find(|s| {
            s.attributes
                .iter()
                .any(|kv| kv.key == "http.request.resend_count")
        })
        .expect("the retry is marked as a resend");
    assert!(
        retry
            .attributes
            .iter()
            .any(|kv| kv.key == "http.response.status_code")
    );
    drop(sidecar);
}

#[actix_rt::test]
async fn an_inbound_request_leaves_a_server_span_with_the_peer_identity_and_the_app_continues_it() {
    use support::mesh::{Pki, call};
    let (collector, spans, arrived) = receiver().await;
    let app = RawUpstream::ok().await;
    let pki = Pki::new("traces");
    let inbound: std::net::SocketAddr = ([127, 0, 0, 1], support::process::free_port()).into();
    let policy = pki.dir.join("policy.yaml");
    std::fs::write(&policy, pki.policy_on(app.addr, &inbound.to_string())).unwrap();
    let mut cmd = sidecar_bin();
    cmd.arg("--policy")
        .arg(&policy)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}"))
        .env("OTEL_TRACES_SAMPLER", "parentbased_always_on")
        .env_remove("SIDECAR_CONFIG")
        .current_dir(std::env::temp_dir());
    let sidecar = SidecarProcess::spawn(cmd);
    // The egress listener is bound first: wait for the inbound one too.
    support::process::until_listening(inbound);

    let trace_id = "5bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "10f067aa0ba902b7";
    let status = call(
        &pki.peer("payments"),
        inbound,
        &format!("traceparent: 00-{trace_id}-{caller_span}-01\r\n"),
    )
    .await;
    assert_eq!(status, Ok(200));

    tokio::time::timeout(support::DEADLINE, async {
        while spans.lock().unwrap().is_empty() {
            arrived.notified().await;
        }
    })
    .await
    .expect("the inbound span reached the collector");
    let spans = spans.lock().unwrap().clone();
    assert_eq!(spans.len(), 1, "one span: the inbound server span");
    let span = &spans[0].1;
    assert_eq!(span.kind, SpanKind::Server as i32);
    assert_eq!(hex(&span.trace_id), trace_id);
    assert_eq!(hex(&span.parent_span_id), caller_span);
    let attribute = |key: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .map(|v| format!("{:?}", v.value))
            .unwrap_or_else(|| panic!("no {key} on {span:?}"))
    };
    assert!(
        attribute("sidecar.peer.identity").contains("spiffe://mesh.test/service/payments"),
        "{span:?}"
    );
    assert!(attribute("sidecar.direction").contains("inbound"));
    assert!(attribute("url.scheme").contains("https"));
    assert!(attribute("http.response.status_code").contains("200"));

    // The app sees the trace continued from the inbound span.
    let seen = app.wait_for(1).await;
    let traceparent = seen[0].header("traceparent").expect("a traceparent");
    assert_eq!(
        traceparent,
        format!("00-{trace_id}-{}-01", hex(&span.span_id))
    );
    drop(sidecar);
}
