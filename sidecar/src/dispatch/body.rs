//! Phase **body**: the app's request body, read into memory when a retry may send it again, streamed otherwise.
//!
//! A body of up to `retries.max_body` bytes is read (by the request's deadline) when the target retries; a
//! larger one, or any body of a target that does not retry, streams to the first attempt with back pressure,
//! its large chunks written to the upstream socket from the buffer they were read into.
//! May answer: 400 `request-body-error` (the body failed while read), 504 `request-timeout` (it did not
//! arrive by the deadline). See `docs/request-path.md`.

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Instant;

use actix_http::body::{self, BodySize, MessageBody, SizedStream};
use actix_http::error::PayloadError;
use actix_http::header::{CONTENT_LENGTH, HeaderMap};
use actix_http::{Payload, RequestHead};
use awc::FrozenClientRequest;
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt, stream};

use crate::error::{Cause, ProxyError};
use crate::telemetry::{BytesIn, Counted, RequestLabels};

/// The app's request body, kept for replay when it is small enough, streamed once otherwise.
pub enum Body {
    None,
    Empty,
    Replay(Bytes),
    /// Kept for replay, sent chunked as the app sent it.
    ReplayChunked(Bytes),
    Sized(u64, Option<Payload>),
    Stream(Option<BoxedPayload>),
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Body::None => "none",
            Body::Empty => "empty",
            Body::Replay(_) => "replay",
            Body::ReplayChunked(_) => "replay-chunked",
            Body::Sized(..) => "sized",
            Body::Stream(_) => "stream",
        };
        f.debug_tuple("Body").field(&kind).finish()
    }
}

impl Body {
    /// Reads a body of up to `replay` bytes into memory (when a retry may send it again: `Some(retries.max_body)`);
    /// streams anything larger, and any body when `replay` is `None`.
    pub async fn read(
        framing: BodySize,
        payload: Payload,
        replay: Option<usize>,
        deadline: Instant,
        labels: &mut RequestLabels,
    ) -> Result<Self, ProxyError> {
        let keep = replay.is_some();
        let max_body = replay.unwrap_or(0);
        match framing {
            BodySize::None => Ok(Body::None),
            BodySize::Sized(0) => Ok(Body::Empty),
            BodySize::Sized(n) if keep && n <= max_body as u64 => {
                labels.bytes_in = BytesIn::Known(n);
                let (chunks, rest) = collect(payload, max_body, deadline).await?;
                match rest {
                    None => Ok(Body::Replay(concat(chunks))),
                    // More bytes than announced: the codec refuses that before we see it, so this only keeps
                    // the stream intact rather than cutting it.
                    Some(rest) => Ok(Body::Sized(
                        n,
                        Some(Payload::from(Box::pin(
                            stream::iter(chunks.into_iter().map(Ok)).chain(rest),
                        ) as BoxedPayload)),
                    )),
                }
            }
            BodySize::Sized(n) => {
                labels.bytes_in = BytesIn::Known(n);
                Ok(Body::Sized(n, Some(payload)))
            }
            BodySize::Stream => {
                let count = Rc::new(Cell::new(0));
                labels.bytes_in = BytesIn::Counted(count.clone());
                if keep {
                    let (chunks, rest) = collect(payload, max_body, deadline).await?;
                    match rest {
                        None => {
                            let body = concat(chunks);
                            count.set(body.len() as u64);
                            return Ok(Body::ReplayChunked(body));
                        }
                        Some(rest) => {
                            let all = stream::iter(chunks.into_iter().map(Ok)).chain(rest);
                            return Ok(Body::Stream(Some(Box::pin(Counted::new(all, count)))));
                        }
                    }
                }
                Ok(Body::Stream(Some(Box::pin(Counted::new(payload, count)))))
            }
        }
    }

    /// The body kept whole, to send to several targets; `None` when it streams (it was too large to keep).
    pub fn whole(&self) -> Option<Whole> {
        match self {
            Body::None => Some(Whole::None),
            Body::Empty => Some(Whole::Empty),
            Body::Replay(b) => Some(Whole::Bytes(b.clone())),
            Body::ReplayChunked(b) => Some(Whole::Chunked(b.clone())),
            Body::Sized(..) | Body::Stream(_) => None,
        }
    }

    /// Whether a retry can send the same body again.
    pub fn replayable(&self) -> bool {
        matches!(
            self,
            Body::None | Body::Empty | Body::Replay(_) | Body::ReplayChunked(_)
        )
    }

    /// Sends the request with this body; a streamed body goes with its first attempt.
    pub fn send(&mut self, request: impl Sender) -> awc::SendClientRequest {
        match self {
            // `send()` would add `content-length: 0` to every GET.
            Body::None => request.body(body::None::new()),
            Body::Empty => request.body(()),
            Body::Replay(bytes) => request.body(bytes.clone()),
            Body::ReplayChunked(bytes) => {
                request.stream(Box::pin(stream::once(std::future::ready(Ok::<
                    _,
                    PayloadError,
                >(
                    bytes.clone()
                )))))
            }
            Body::Sized(n, payload) => match payload.take() {
                Some(p) => request.body(SizedStream::new(*n, p)),
                None => request.body(()),
            },
            Body::Stream(stream) => match stream.take() {
                Some(s) => request.stream(s),
                None => request.body(()),
            },
        }
    }
}

/// A body kept whole: sent as many times as needed, from any thread (a fan-out's targets share its bytes).
#[derive(Debug, Clone)]
pub enum Whole {
    None,
    Empty,
    Bytes(Bytes),
    /// Sent chunked, as the app sent it.
    Chunked(Bytes),
}

impl Whole {
    /// A body to send it with, sharing its bytes.
    pub fn body(&self) -> Body {
        match self {
            Whole::None => Body::None,
            Whole::Empty => Body::Empty,
            Whole::Bytes(b) => Body::Replay(b.clone()),
            Whole::Chunked(b) => Body::ReplayChunked(b.clone()),
        }
    }
}

/// What a body is sent with: the frozen request as it is, or with this attempt's extra headers.
pub trait Sender {
    fn body(self, body: impl MessageBody + 'static) -> awc::SendClientRequest;
    fn stream(self, stream: BoxedPayload) -> awc::SendClientRequest;
}

impl Sender for &FrozenClientRequest {
    fn body(self, body: impl MessageBody + 'static) -> awc::SendClientRequest {
        self.send_body(body)
    }
    fn stream(self, stream: BoxedPayload) -> awc::SendClientRequest {
        self.send_stream(stream)
    }
}

impl Sender for awc::FrozenSendBuilder {
    fn body(self, body: impl MessageBody + 'static) -> awc::SendClientRequest {
        self.send_body(body)
    }
    fn stream(self, stream: BoxedPayload) -> awc::SendClientRequest {
        self.send_stream(stream)
    }
}

pub type BoxedPayload = Pin<Box<dyn Stream<Item = Result<Bytes, PayloadError>>>>;

/// Reads the body until it ends (`None` rest) or passes `limit` bytes (the rest of the stream returned), by the
/// request's deadline.
async fn collect(
    mut payload: Payload,
    limit: usize,
    deadline: Instant,
) -> Result<(Vec<Bytes>, Option<Payload>), ProxyError> {
    let mut chunks = Vec::new();
    let mut read = 0;
    let reading = async {
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| {
                ProxyError::new(
                    Cause::RequestBody,
                    "",
                    format!("reading the request body: {e}"),
                )
            })?;
            read += chunk.len();
            chunks.push(chunk);
            if read > limit {
                return Ok(false);
            }
        }
        Ok(true)
    };
    let complete = tokio::time::timeout_at(deadline.into(), reading)
        .await
        .map_err(|_| {
            ProxyError::new(
                Cause::RequestTimeout,
                "",
                "the request body did not arrive within the request timeout",
            )
        })??;
    Ok((chunks, (!complete).then_some(payload)))
}

fn concat(chunks: Vec<Bytes>) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.into_iter().next().unwrap_or_default(),
        _ => {
            let mut all = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
            for c in chunks {
                all.extend_from_slice(&c);
            }
            all.freeze()
        }
    }
}

/// The framing of the app's request body, read before its headers are moved.
pub fn request_body(head: &RequestHead) -> BodySize {
    if head
        .headers
        .contains_key(actix_http::header::TRANSFER_ENCODING)
    {
        // The codec has already refused anything but a final `chunked` coding.
        return BodySize::Stream;
    }
    content_length(&head.headers).map_or(BodySize::None, BodySize::Sized)
}

/// A `Content-Length` header's value.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}
