//! Dispatch rules in the seed dispatcher's format: the header named by `key` picks a rewrite, whose patch is
//! applied and whose destination receives the request; anything else goes to the default destination.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

mod support;

use support::{RawUpstream, Sidecar, get, request};

/// The seed README's example, pointed at two fake upstreams.
fn seed_policy(dev: &RawUpstream, default: &RawUpstream) -> String {
    format!(
        "dispatch:
  rewrites: # set of rewrite rules
    dev: # value of key propery. i.e -H 'environment: dev'
      patch: # action type
        - key: Host # header key
          val: example.com # header value
        - key: dispatched
          val: true
      destination: {} # (optional) destination url
    qa:
      patch:
        - key: x-env
          val: qa
  key: environment # key used to dispatch request
  destination: {} # default destination url
",
        dev.url("/"),
        default.url("")
    )
}

#[actix_rt::test]
async fn a_matching_value_patches_headers_and_goes_to_its_destination() {
    let (dev, default) = (RawUpstream::ok().await, RawUpstream::ok().await);
    let sidecar = Sidecar::start(&seed_policy(&dev, &default));
    let reply = request(
        sidecar.addr,
        "GET /search?q=1 HTTP/1.1\r\nhost: app.local\r\nenvironment: dev\r\ndispatched: no\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status, 200);
    let seen = &dev.wait_for(1).await[0];
    assert_eq!(seen.target, "/search?q=1");
    assert_eq!(seen.all("host"), ["example.com"], "{}", seen.head);
    assert_eq!(seen.all("dispatched"), ["true"]);
    assert_eq!(seen.all("environment"), ["dev"]);
    assert_eq!(seen.all("x-forwarded-for"), ["127.0.0.1"]);
    assert!(default.received().is_empty());
    sidecar.stop().await;
}

#[actix_rt::test]
async fn a_rewrite_without_destination_patches_and_goes_to_the_default() {
    let (dev, default) = (RawUpstream::ok().await, RawUpstream::ok().await);
    let sidecar = Sidecar::start(&seed_policy(&dev, &default));
    get(
        sidecar.addr,
        "/",
        &[("Environment", "qa"), ("x-env", "prod")],
    )
    .await;
    let seen = &default.wait_for(1).await[0];
    assert_eq!(seen.all("x-env"), ["qa"]);
    assert_eq!(seen.all("host"), [default.addr.to_string()]);
    sidecar.stop().await;
}

#[actix_rt::test]
async fn an_unknown_value_or_a_missing_header_goes_to_the_default_unpatched() {
    let (dev, default) = (RawUpstream::ok().await, RawUpstream::ok().await);
    let sidecar = Sidecar::start(&seed_policy(&dev, &default));
    get(sidecar.addr, "/a", &[("environment", "staging")]).await;
    get(sidecar.addr, "/b", &[("environment", "DEV")]).await;
    get(sidecar.addr, "/c", &[]).await;
    let seen = default.wait_for(3).await;
    let paths: Vec<_> = seen.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(paths, ["/a", "/b", "/c"]);
    assert!(seen.iter().all(|r| r.header("dispatched").is_none()));
    assert!(dev.received().is_empty());
    sidecar.stop().await;
}

#[actix_rt::test]
async fn forwarded_for_is_appended_to_what_the_app_sent() {
    let (dev, default) = (RawUpstream::ok().await, RawUpstream::ok().await);
    let sidecar = Sidecar::start(&seed_policy(&dev, &default));
    get(sidecar.addr, "/", &[("x-forwarded-for", "203.0.113.7")]).await;
    let seen = &default.wait_for(1).await[0];
    assert_eq!(seen.all("x-forwarded-for"), ["203.0.113.7, 127.0.0.1"]);
    sidecar.stop().await;
}

#[actix_rt::test]
async fn a_target_header_wins_over_the_rules() {
    let (dev, default, other) = (
        RawUpstream::ok().await,
        RawUpstream::ok().await,
        RawUpstream::ok().await,
    );
    let sidecar = Sidecar::start(&seed_policy(&dev, &default));
    get(
        sidecar.addr,
        "/t",
        &[("environment", "dev"), ("target", &other.url(""))],
    )
    .await;
    let seen = &other.wait_for(1).await[0];
    assert!(seen.header("dispatched").is_none());
    assert!(seen.header("x-forwarded-for").is_none());
    assert!(dev.received().is_empty() && default.received().is_empty());
    sidecar.stop().await;
}

#[actix_rt::test]
async fn a_destination_that_is_down_gives_502_and_the_sidecar_keeps_serving() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let sidecar = Sidecar::start(&format!("dispatch:\n  destination: {down}\n"));
    for _ in 0..3 {
        let reply = request(sidecar.addr, "GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert_eq!(reply.status, 502);
        assert_eq!(reply.header("x-sidecar-error"), Some("upstream-refused"));
    }
    sidecar.stop().await;
}
