//! Reading a request body under the byte cap and the body timeout.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};

use crate::response::{error_close, Body};
use crate::shared::Shared;

/// Reads a request body under the byte cap and the body timeout; an error is the response
/// to send (the connection closes after it, without reading the rest).
pub(crate) async fn read_body(
    request: Request<Incoming>,
    shared: &Shared,
) -> Result<Bytes, Response<Body>> {
    let max = shared.config.limits.max_body;
    let too_large = || {
        shared
            .metrics
            .body_too_large
            .fetch_add(1, Ordering::Relaxed);
        error_close(413, &format!("request body above the limit of {max} bytes"))
    };
    let declared = request
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let limited = http_body_util::Limited::new(request.into_body(), max);
    match tokio::time::timeout(shared.config.limits.body_timeout, limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(error_close(400, &format!("reading the request body: {e}"))),
        Err(_) => {
            shared.metrics.body_timeouts.fetch_add(1, Ordering::Relaxed);
            Err(error_close(
                408,
                &format!(
                    "request body not received within {} ms",
                    shared.config.limits.body_timeout.as_millis()
                ),
            ))
        }
    }
}
