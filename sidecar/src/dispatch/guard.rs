//! Phase **guard**: what is refused before anything is looked up. The codec has already refused malformed
//! framing (`Content-Length` with `Transfer-Encoding`, heads over 128 KiB); this bounds the request head by the
//! policy's `listeners.max_header_size`.
//! May answer: 431 `headers-too-large` (and the connection is closed). See `docs/request-path.md`.

use actix_http::RequestHead;

use super::headers::head_size;
use crate::error::{Cause, ProxyError};

/// The guard phase: the head must be at most `max_header_size` bytes.
pub fn guard(head: &RequestHead, max_header_size: usize) -> Result<(), ProxyError> {
    if head_size(head) > max_header_size {
        return Err(ProxyError::new(
            Cause::HeadersTooLarge,
            "",
            format!("the request header section is over {max_header_size} bytes"),
        ));
    }
    Ok(())
}
