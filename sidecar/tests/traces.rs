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

/// The string value of a span attribute.
fn attribute(span: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match &v.value {
            Some(Value::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
}

/// Regressions (issue 15 item 13): B3 headers from the app went upstream unchanged beside the sidecar's new
/// `traceparent`, so a Zipkin-instrumented upstream took the app's span as its parent and two contexts
/// disagreed; and a span's `url.full` carried the query string (tokens) to the collector while the access log
/// leaves queries out.
#[actix_rt::test]
async fn b3_is_written_in_the_apps_form_and_spans_leave_the_query_out() {
    let (collector, spans, arrived) = receiver().await;
    let upstream = RawUpstream::ok().await;
    let mut cmd = sidecar_bin();
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}"))
        .env("OTEL_TRACES_SAMPLER", "parentbased_always_on")
        .env_remove("SIDECAR_POLICY")
        .env_remove("SIDECAR_CONFIG")
        .current_dir(std::env::temp_dir());
    let sidecar = SidecarProcess::spawn(cmd);

    let (trace, app_span, app_parent) = (
        "463ac35c9f6413ad48485a3953bb6124",
        "a2fb4a1d1a96d312",
        "0020000000000001",
    );
    let multi = get(
        sidecar.addr,
        "/orders/7?token=secret",
        &[
            ("target", &upstream.url("")),
            ("x-b3-traceid", trace),
            ("x-b3-spanid", app_span),
            ("x-b3-parentspanid", app_parent),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    assert_eq!(multi.status, 200);
    let single = get(
        sidecar.addr,
        "/single",
        &[
            ("target", &upstream.url("")),
            ("b3", &format!("{trace}-{app_span}-1")),
        ],
    )
    .await;
    assert_eq!(single.status, 200);

    let seen = upstream.wait_for(2).await;
    let traceparent_span = |r: &support::Received| {
        let tp = r.header("traceparent").expect("traceparent sent upstream");
        assert!(tp.starts_with(&format!("00-{trace}-")), "{tp}");
        tp.split('-').nth(2).unwrap().to_string()
    };
    // The multi-header form: every field names the sidecar's attempt span, whose parent is the server span.
    let ours = traceparent_span(&seen[0]);
    assert_eq!(seen[0].header("x-b3-traceid"), Some(trace));
    assert_eq!(seen[0].header("x-b3-spanid"), Some(ours.as_str()));
    assert_eq!(seen[0].header("x-b3-sampled"), Some("1"));
    assert_eq!(
        seen[0].all("x-b3-spanid").len(),
        1,
        "one value, not the app's beside ours"
    );
    let server_span = seen[0].header("x-b3-parentspanid").unwrap().to_string();
    assert_ne!(server_span, app_parent);
    assert_ne!(server_span, app_span);
    // The single-header form.
    let ours = traceparent_span(&seen[1]);
    let b3 = seen[1].header("b3").unwrap();
    assert!(b3.starts_with(&format!("{trace}-{ours}-1-")), "{b3}");
    assert_eq!(seen[1].all("b3").len(), 1);

    tokio::time::timeout(support::DEADLINE, async {
        while spans
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| s.kind == SpanKind::Client as i32)
            .count()
            < 2
        {
            arrived.notified().await;
        }
    })
    .await
    .expect("the spans reached the collector");
    let spans = spans.lock().unwrap().clone();
    let server = spans
        .iter()
        .find(|(_, s)| s.kind == SpanKind::Server as i32 && hex(&s.span_id) == server_span)
        .expect("the server span B3 names as parent");
    assert_eq!(hex(&server.1.parent_span_id), app_span);
    let urls: Vec<String> = spans
        .iter()
        .filter_map(|(_, s)| attribute(s, "url.full"))
        .collect();
    assert!(urls.contains(&upstream.url("/orders/7")), "{urls:?}");
    assert!(urls.iter().all(|u| !u.contains("token")), "{urls:?}");
    drop(sidecar);
}

#[actix_rt::test]
async fn each_fan_out_target_is_a_branch_of_the_requests_trace() {
    let (collector, spans, arrived) = receiver().await;
    let (a, b) = (RawUpstream::ok().await, RawUpstream::ok().await);
    let dir = std::env::temp_dir().join(format!("sidecar-fanout-traces-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "fanout:\n  g:\n    mode: all\n    targets:\n      - {{to: '{}', name: a}}\n      - {{to: '{}', name: b}}\n",
            a.url(""),
            b.url("")
        ),
    )
    .unwrap();
    let mut cmd = sidecar_bin();
    cmd.arg("--policy")
        .arg(&policy)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}"))
        .env("OTEL_TRACES_SAMPLER", "parentbased_always_on")
        .env_remove("SIDECAR_CONFIG")
        .current_dir(std::env::temp_dir());
    let sidecar = SidecarProcess::spawn(cmd);

    let reply = get(sidecar.addr, "/hook", &[("fanout", "g")]).await;
    assert_eq!(reply.status, 200);
    tokio::time::timeout(support::DEADLINE, async {
        while spans.lock().unwrap().len() < 5 {
            arrived.notified().await;
        }
    })
    .await
    .expect("the spans reached the collector");
    let spans: Vec<Span> = spans
        .lock()
        .unwrap()
        .iter()
        .map(|(_, s)| s.clone())
        .collect();
    let of =
        |kind: SpanKind| -> Vec<&Span> { spans.iter().filter(|s| s.kind == kind as i32).collect() };
    let (server, legs, clients) = (
        of(SpanKind::Server),
        of(SpanKind::Internal),
        of(SpanKind::Client),
    );
    assert_eq!((server.len(), legs.len(), clients.len()), (1, 2, 2));
    let mut names: Vec<&str> = legs.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["fanout a", "fanout b"]);
    for leg in &legs {
        assert_eq!(
            leg.parent_span_id, server[0].span_id,
            "a leg is a child of the request"
        );
        let children: Vec<_> = clients
            .iter()
            .filter(|c| c.parent_span_id == leg.span_id)
            .collect();
        assert_eq!(children.len(), 1, "each leg's attempt is its child");
    }
    drop(sidecar);
    let _ = std::fs::remove_dir_all(&dir);
}

#[actix_rt::test]
async fn a_shadow_copy_is_a_client_span_of_the_request_naming_the_copys_endpoint() {
    let (collector, spans, arrived) = receiver().await;
    let (primary, copy) = (RawUpstream::ok().await, RawUpstream::ok().await);
    let dir = std::env::temp_dir().join(format!("sidecar-shadow-traces-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "services:\n  orders:\n    endpoints: ['{}']\n    shadow:\n      - to: '{}'\n",
            primary.addr,
            copy.url("")
        ),
    )
    .unwrap();
    let mut cmd = sidecar_bin();
    cmd.arg("--policy")
        .arg(&policy)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}"))
        .env("OTEL_TRACES_SAMPLER", "parentbased_always_on")
        .env_remove("SIDECAR_CONFIG")
        .current_dir(std::env::temp_dir());
    let sidecar = SidecarProcess::spawn(cmd);

    let reply = get(
        sidecar.addr,
        "/items?token=secret",
        &[("target", "orders"), ("internal", "true")],
    )
    .await;
    assert_eq!(reply.status, 200);
    tokio::time::timeout(support::DEADLINE, async {
        while spans.lock().unwrap().len() < 3 {
            arrived.notified().await;
        }
    })
    .await
    .expect("the spans reached the collector");
    let spans: Vec<Span> = spans
        .lock()
        .unwrap()
        .iter()
        .map(|(_, s)| s.clone())
        .collect();
    let server = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .expect("a server span");
    let clients: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Client as i32)
        .collect();
    assert_eq!(clients.len(), 2, "the primary's attempt and the copy");
    assert!(clients.iter().all(|c| c.parent_span_id == server.span_id));
    let copy_span = clients
        .iter()
        .find(|c| attribute(c, "sidecar.shadow.copy").is_some())
        .unwrap_or_else(|| panic!("a span is the copy's: {clients:?}"));
    let keys: Vec<&str> = copy_span
        .attributes
        .iter()
        .map(|kv| kv.key.as_str())
        .collect();
    let mut unique = keys.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), keys.len(), "no attribute twice: {keys:?}");
    let url = attribute(copy_span, "url.full").unwrap();
    assert_eq!(url, copy.url("/items"), "the copy's endpoint, no query");
    let received = &copy.wait_for(1).await[0];
    assert!(
        received
            .header("traceparent")
            .is_some_and(|t| t.contains(&hex(&copy_span.span_id))),
        "the copy continues the trace from its span"
    );
    drop(sidecar);
    let _ = std::fs::remove_dir_all(&dir);
}
