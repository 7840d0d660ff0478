//! The answers of a request zdt refuses itself (a drain, no ready instance,
//! a closed gate), counted as unavailable: as hyper responses and as bytes
//! for the relay.

use std::sync::atomic::Ordering;

use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use super::hyper_path::text;
use super::{gate, relay, ProxyBody, Shared};

/// The text of a 503, counted as one.
fn unavailable_message(shared: &Shared) -> String {
    shared.traffic.unavailable.fetch_add(1, Ordering::Relaxed);
    format!(
        "503 Service Unavailable: {} has no ready instance\n",
        shared.program
    )
}

pub(super) fn unavailable(shared: &Shared) -> Response<ProxyBody> {
    let mut resp = text(StatusCode::SERVICE_UNAVAILABLE, unavailable_message(shared));
    let h = resp.headers_mut();
    h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// The 503 of a program without a ready instance, as bytes (relay path).
pub(super) fn unavailable_text(shared: &Shared) -> Vec<u8> {
    relay::text(
        "503 Service Unavailable",
        &unavailable_message(shared),
        "Retry-After: 1\r\nConnection: close\r\n",
    )
}

/// `Retry-After` of the 503 a request held past a pause's max gets.
const PAUSE_RETRY_AFTER: &str = "5";
/// `Retry-After` of a maintenance 503.
const MAINTENANCE_RETRY_AFTER: &str = "30";

/// The body and `Retry-After` of the 503 a closed gate answers, counted.
pub(super) fn closed_message(shared: &Shared, why: &gate::Closed) -> (String, &'static str) {
    shared.traffic.unavailable.fetch_add(1, Ordering::Relaxed);
    match why {
        gate::Closed::Maintenance(message) => (message.to_string(), MAINTENANCE_RETRY_AFTER),
        gate::Closed::PauseExpired(max) => (
            format!(
                "503 Service Unavailable: {} is paused; this request waited {max:?} (max-pause)\n",
                shared.program
            ),
            PAUSE_RETRY_AFTER,
        ),
    }
}

/// The 503 of a closed gate (hyper path).
pub(super) fn closed(shared: &Shared, why: &gate::Closed) -> Response<ProxyBody> {
    let (body, retry) = closed_message(shared, why);
    let mut resp = text(StatusCode::SERVICE_UNAVAILABLE, body);
    let h = resp.headers_mut();
    h.insert(header::RETRY_AFTER, HeaderValue::from_static(retry));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// The 503 of a closed gate, as bytes (relay path).
pub(super) fn closed_text(shared: &Shared, why: &gate::Closed) -> Vec<u8> {
    let (body, retry) = closed_message(shared, why);
    relay::text(
        "503 Service Unavailable",
        &body,
        &format!("Retry-After: {retry}\r\nConnection: close\r\n"),
    )
}
