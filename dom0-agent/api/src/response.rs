//! JSON responses: the body type and the three ways the API answers (with extra headers,
//! an error, an error that closes the connection). A leaf of the crate.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use serde_json::{json, Value};

pub(crate) type Body = Full<Bytes>;

pub(crate) fn respond(code: u16, body: &Value, extra: &[(&'static str, &str)]) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    for (name, value) in extra {
        if let Ok(v) = hyper::header::HeaderValue::from_str(value) {
            headers.insert(*name, v);
        }
    }
    response
}

pub(crate) fn error(code: u16, message: &str) -> Response<Body> {
    respond(code, &json!({ "error": message }), &[])
}

/// An error after which the connection is closed (the rest of the request is not read).
pub(crate) fn error_close(code: u16, message: &str) -> Response<Body> {
    respond(
        code,
        &json!({ "error": message }),
        &[("connection", "close")],
    )
}
