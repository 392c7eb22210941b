//! The egress contract, told as stories: an app calls the sidecar on its port, a fake upstream shows what
//! arrived, the app sees what came back.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

mod support;

use support::{Conn, RawUpstream, Sidecar, get, request, response};

const NO_POLICY: &str = "{}";

#[actix_rt::test]
async fn a_target_url_is_a_prefix_and_the_request_path_and_query_follow_it() {
    let upstream = RawUpstream::ok().await;
    let sidecar = Sidecar::start(NO_POLICY);

    let target = upstream.url("/api");
    assert_eq!(
        get(sidecar.addr, "/items?id=7", &[("target", &target)])
            .await
            .status,
        200
    );
    assert_eq!(
        get(sidecar.addr, "/", &[("target", &target)]).await.status,
        200
    );

    let seen = upstream.wait_for(2).await;
    assert_eq!(seen[0].target, "/api/items?id=7");
    assert_eq!(seen[1].target, "/api");
    sidecar.stop().await;
}

#[actix_rt::test]
async fn path_and_query_pass_byte_for_byte() {
    let upstream = RawUpstream::ok().await;
    let sidecar = Sidecar::start(NO_POLICY);
    let odd = "/a%2Fb/./c/../d;p=1?x=%20&&y=%zz&z=a+b";
    get(sidecar.addr, odd, &[("target", &upstream.url(""))]).await;
    assert_eq!(upstream.wait_for(1).await[0].target, odd);
    sidecar.stop().await;
}

#[actix_rt::test]
async fn the_scheme_is_case_insensitive_and_host_is_the_targets_authority() {
    let upstream = RawUpstream::ok().await;
    let sidecar = Sidecar::start(NO_POLICY);
    let target = format!("HTTP://{}/x", upstream.addr);
    assert_eq!(
        get(sidecar.addr, "/y", &[("target", &target)]).await.status,
        200
    );
    let seen = &upstream.wait_for(1).await[0];
    assert_eq!(seen.all("host"), [upstream.addr.to_string()]);
    assert_eq!(seen.target, "/x/y");
    sidecar.stop().await;
}

#[actix_rt::test]
async fn target_and_internal_are_consumed_and_hop_by_hop_headers_removed() {
    let upstream = RawUpstream::ok().await;
    let sidecar = Sidecar::start(NO_POLICY);
    let raw = format!(
        "GET /h HTTP/1.1\r\nhost: localhost:5000\r\ntarget: {}\r\ninternal: false\r\n\
         connection: keep-alive, x-hop\r\nx-hop: private\r\nkeep-alive: timeout=5\r\n\
         proxy-connection: keep-alive\r\nte: trailers\r\ntrailer: x-t\r\nupgrade: h2c\r\n\
         proxy-authorization: Basic eDp5\r\nx-end: 1\r\nx-end: 2\r\naccept: */*\r\n\r\n",
        upstream.url("")
    );
    assert_eq!(request(sidecar.addr, &raw).await.status, 200);
    let seen = &upstream.wait_for(1).await[0];
    for gone in [
        "target",
        "internal",
        "x-hop",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
    ] {
        assert!(
            seen.header(gone).is_none(),
            "{gone} reached the upstream:\n{}",
            seen.head
        );
    }
    assert_eq!(seen.all("x-end"), ["1", "2"]);
    assert_eq!(seen.all("accept"), ["*/*"]);
    sidecar.stop().await;
}

#[actix_rt::test]
async fn the_sidecar_adds_no_user_agent_or_accept_encoding_and_does_not_follow_redirects() {
    let upstream = RawUpstream::start(|_| {
        response(
            302,
            &[("location", "/elsewhere"), ("content-length", "0")],
            b"",
        )
    })
    .await;
    let sidecar = Sidecar::start(NO_POLICY);
    let reply = get(sidecar.addr, "/r", &[("target", &upstream.url(""))]).await;
    assert_eq!(reply.status, 302);
    assert_eq!(reply.header("location"), Some("/elsewhere"));
    let seen = upstream.wait_for(1).await;
    assert_eq!(seen.len(), 1, "the redirect was followed");
    assert!(seen[0].header("user-agent").is_none(), "{}", seen[0].head);
    assert!(
        seen[0].header("accept-encoding").is_none(),
        "{}",
        seen[0].head
    );
    assert!(
        seen[0].header("content-length").is_none(),
        "a GET grew a body:\n{}",
        seen[0].head
    );
    sidecar.stop().await;
}

#[actix_rt::test]
async fn response_headers_come_back_as_sent_repeated_ones_included_hop_by_hop_removed() {
    let upstream = RawUpstream::start(|_| {
        response(
            200,
            &[
                ("set-cookie", "a=1; Path=/"),
                ("set-cookie", "b=2; HttpOnly"),
                ("x-upstream", "yes"),
                ("connection", "x-private"),
                ("x-private", "secret"),
                ("keep-alive", "timeout=60"),
                ("proxy-authenticate", "Basic"),
                ("content-length", "5"),
            ],
            b"hello",
        )
    })
    .await;
    let sidecar = Sidecar::start(NO_POLICY);
    let reply = get(sidecar.addr, "/", &[("target", &upstream.url(""))]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.all("set-cookie"), ["a=1; Path=/", "b=2; HttpOnly"]);
    assert_eq!(reply.header("x-upstream"), Some("yes"));
    for gone in ["x-private", "keep-alive", "proxy-authenticate"] {
        assert!(
            reply.header(gone).is_none(),
            "{gone} came back:\n{}",
            reply.head
        );
    }
    assert!(
        reply.header("content-type").is_none(),
        "invented content-type:\n{}",
        reply.head
    );
    assert_eq!(reply.body, b"hello");
    sidecar.stop().await;
}

#[actix_rt::test]
async fn upstream_statuses_are_relayed_as_they_are() {
    let upstream = RawUpstream::start(|req| {
        let status: u16 = req.target.trim_start_matches('/').parse().unwrap_or(200);
        if status == 204 || status == 304 {
            response(status, &[], b"")
        } else {
            response(status, &[("content-length", "4")], b"body")
        }
    })
    .await;
    let sidecar = Sidecar::start(NO_POLICY);
    for status in [200u16, 201, 204, 304, 404, 418, 500, 502, 503] {
        let reply = get(
            sidecar.addr,
            &format!("/{status}"),
            &[("target", &upstream.url(""))],
        )
        .await;
        assert_eq!(reply.status, status);
        assert!(
            reply.header("x-sidecar-error").is_none(),
            "{status} looked like ours"
        );
    }
    sidecar.stop().await;
}

#[actix_rt::test]
async fn every_method_passes_with_its_body() {
    let upstream = RawUpstream::start(|req| {
        let body = format!("{} {}", req.method, req.body.len());
        response(
            200,
            &[("content-length", &body.len().to_string())],
            body.as_bytes(),
        )
    })
    .await;
    let sidecar = Sidecar::start(NO_POLICY);
    let target = upstream.url("");
    for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PURGE"] {
        let raw = format!(
            "{method} /m HTTP/1.1\r\nhost: x\r\ntarget: {target}\r\ncontent-length: 3\r\n\r\nabc"
        );
        let reply = request(sidecar.addr, &raw).await;
        assert_eq!(reply.text(), format!("{method} 3"));
    }
    let head = request(
        sidecar.addr,
        &format!("HEAD /m HTTP/1.1\r\nhost: x\r\ntarget: {target}\r\n\r\n"),
    )
    .await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("6"), "{}", head.head);
    sidecar.stop().await;
}

#[actix_rt::test]
async fn chunked_uploads_stream_to_the_upstream_chunked() {
    let upstream = RawUpstream::start(|req| {
        let body = req.body.len().to_string();
        response(
            200,
            &[("content-length", &body.len().to_string())],
            body.as_bytes(),
        )
    })
    .await;
    let sidecar = Sidecar::start(NO_POLICY);
    let raw = format!(
        "POST /c HTTP/1.1\r\nhost: x\r\ntarget: {}\r\ntransfer-encoding: chunked\r\n\r\n\
         5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        upstream.url("")
    );
    let reply = request(sidecar.addr, &raw).await;
    assert_eq!(reply.text(), "11");
    let seen = &upstream.wait_for(1).await[0];
    assert_eq!(seen.body, b"hello world");
    assert_eq!(seen.header("transfer-encoding"), Some("chunked"));
    sidecar.stop().await;
}

#[actix_rt::test]
async fn keep_alive_holds_on_both_sides() {
    let upstream = RawUpstream::ok().await;
    let sidecar = Sidecar::start(NO_POLICY);
    let mut conn = Conn::open(sidecar.addr).await;
    let raw = format!(
        "GET /k HTTP/1.1\r\nhost: x\r\ntarget: {}\r\n\r\n",
        upstream.url("")
    );
    for _ in 0..5 {
        conn.send(raw.as_bytes()).await;
        assert_eq!(conn.read(false).await.status, 200);
    }
    upstream.wait_for(5).await;
    assert_eq!(
        upstream.connections(),
        1,
        "the upstream connection was not reused"
    );
    sidecar.stop().await;
}

#[actix_rt::test]
async fn internal_targets_go_to_the_registrys_endpoints() {
    let upstream = RawUpstream::ok().await;
    let sidecar = Sidecar::start(&format!(
        "services:\n  orders:\n    endpoints: ['{}']\n",
        upstream.addr
    ));
    let reply = get(
        sidecar.addr,
        "/o",
        &[("target", "orders"), ("internal", "true")],
    )
    .await;
    assert_eq!(reply.status, 200);
    let seen = &upstream.wait_for(1).await[0];
    assert_eq!(seen.target, "/o");
    assert_eq!(
        seen.header("host"),
        Some(upstream.addr.to_string().as_str())
    );
    sidecar.stop().await;
}

#[actix_rt::test]
async fn expect_continue_is_answered_by_the_sidecar_and_not_forwarded() {
    let upstream = RawUpstream::start(|req| {
        let body = String::from_utf8_lossy(&req.body).into_owned();
        response(
            200,
            &[("content-length", &body.len().to_string())],
            body.as_bytes(),
        )
    })
    .await;
    let sidecar = Sidecar::start(NO_POLICY);
    let mut conn = Conn::open(sidecar.addr).await;
    let head = format!(
        "PUT /e HTTP/1.1\r\nhost: x\r\ntarget: {}\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n",
        upstream.url("")
    );
    conn.send(head.as_bytes()).await;
    assert_eq!(conn.read(false).await.status, 100);
    conn.send(b"data").await;
    let reply = conn.read(false).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "data");
    let seen = &upstream.wait_for(1).await[0];
    assert!(seen.header("expect").is_none(), "{}", seen.head);
    sidecar.stop().await;
}

#[actix_rt::test]
async fn a_304_with_content_length_ends_without_a_body_and_the_connection_goes_on() {
    let upstream = RawUpstream::start(|req| {
        if req.target == "/cached" {
            response(304, &[("content-length", "10"), ("etag", "\"v1\"")], b"")
        } else {
            response(200, &[("content-length", "2")], b"ok")
        }
    })
    .await;
    let sidecar = Sidecar::start(NO_POLICY);
    let mut conn = Conn::open(sidecar.addr).await;
    let target = upstream.url("");
    conn.send(format!("GET /cached HTTP/1.1\r\nhost: x\r\ntarget: {target}\r\n\r\n").as_bytes())
        .await;
    let reply = conn.read(false).await;
    assert_eq!(reply.status, 304);
    assert_eq!(reply.header("etag"), Some("\"v1\""));
    assert_eq!(reply.header("content-length"), Some("10"), "{}", reply.head);
    // The app's connection is not left waiting for ten bytes that never come.
    conn.send(format!("GET /next HTTP/1.1\r\nhost: x\r\ntarget: {target}\r\n\r\n").as_bytes())
        .await;
    assert_eq!(conn.read(false).await.text(), "ok");
    sidecar.stop().await;
}

#[actix_rt::test]
async fn a_head_response_keeps_its_length_and_has_no_body() {
    let upstream = RawUpstream::start(|_| response(200, &[("content-length", "1234")], b"")).await;
    let sidecar = Sidecar::start(NO_POLICY);
    let mut conn = Conn::open(sidecar.addr).await;
    let target = upstream.url("");
    for _ in 0..2 {
        conn.send(format!("HEAD /h HTTP/1.1\r\nhost: x\r\ntarget: {target}\r\n\r\n").as_bytes())
            .await;
        let reply = conn.read(true).await;
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.header("content-length"),
            Some("1234"),
            "{}",
            reply.head
        );
    }
    sidecar.stop().await;
}
