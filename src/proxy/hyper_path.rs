//! The hyper path: what the relay does not take (HTTP/1.0, Upgrade,
//! Expect, malformed heads) is served by hyper's server (`serve`) and
//! forwarded by hyper's client (`handle`, through the upstream's
//! [`pool`]), with Upgrade tunnels (`tunnel`).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::answers::{closed, unavailable};
use super::body::{self, GuardedBody};
use super::route::{route, Refused};
use super::{
    canary, framing, pool, workers, InflightGuard, PrivateAddr, ProxyBody, Shared, MAX_HEADERS,
};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

pub(super) async fn serve<I>(
    io: I,
    peer: Option<std::net::IpAddr>,
    shared: Arc<Shared>,
    gate: Arc<framing::Gate>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (header_timeout, max_header) = (
        shared.options.header_timeout,
        shared.options.max_header_bytes,
    );
    // The client's address as a header value, once per connection.
    let peer = peer.and_then(|ip| HeaderValue::from_str(&ip.to_string()).ok());
    let conns = shared.workers.conns().clone();
    let svc = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let peer = peer.clone();
        let gate = gate.clone();
        async move {
            let connect = req.method() == Method::CONNECT;
            let version = req.version();
            let mut resp = handle(req, &peer, &shared, &gate).await;
            shared.traffic.stats.answered(resp.status().as_u16());
            // Retiring: the answer closes its connection, unless it makes
            // a tunnel of it (then hyper hands the connection over).
            let tunnel = resp.status() == StatusCode::SWITCHING_PROTOCOLS
                || (connect && resp.status().is_success());
            if shared.workers.retire().is_retiring() && !tunnel {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                // hyper would add `keep-alive` for an HTTP/1.0 client that
                // asked for it unless the answer is HTTP/1.0 too (it is
                // sent as HTTP/1.0 to such a client anyway).
                if version == hyper::Version::HTTP_10 {
                    *resp.version_mut() = hyper::Version::HTTP_10;
                }
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_header_size(max_header)
        .max_headers(MAX_HEADERS)
        // Room for the header plus some body; never below hyper's minimum.
        .max_buf_size((max_header + 16 * 1024).max(8192))
        .serve_connection(io, svc)
        .with_upgrades();
    tokio::pin!(conn);
    // The relay's task serves this: its `Registered` wakes it when
    // retiring begins or ends.
    let retire = &conns.retire;
    let ended = loop {
        tokio::select! {
            r = &mut conn => break r,
            () = retire.turned(false) => {}
        }
        // Retiring: an idle connection gets `grace` for a next request;
        // then hyper closes it, or ends it after the answer in progress.
        tokio::select! {
            biased;
            r = &mut conn => break r,
            () = retire.turned(true) => continue,
            () = tokio::time::sleep(retire.grace()) => {}
        }
        conn.as_mut().graceful_shutdown();
        break conn.await;
    };
    if let Err(e) = ended {
        tracing::debug!(cause = %e, "client connection ended with an error");
    }
}

/// Hop-by-hop headers, never forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Usually none is there: one pass over the names instead of a lookup each.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
}

pub(super) fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Copies bytes both ways between an upgraded client connection and its
/// upstream until the upstream side ends (closed, or killed at `max_wait`);
/// the client closing its side is passed on as a half-close. Counted as an
/// open client connection (`open`) while it runs: retiring waits for it.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    mut guard: InflightGuard,
    program: String,
    path: String,
    _open: workers::Open,
) {
    use tokio::io::AsyncWriteExt;
    let (client, upstream) = match tokio::join!(client, upstream) {
        (Ok(c), Ok(u)) => (TokioIo::new(c), TokioIo::new(u)),
        (c, u) => {
            let cause = c.err().or(u.err()).map(|e| e.to_string());
            tracing::warn!(%program, %path, ?cause, "upgrade failed");
            guard.fail();
            return;
        }
    };
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let up = async {
        let _ = tokio::io::copy(&mut cr, &mut uw).await;
        let _ = uw.shutdown().await;
        std::future::pending::<()>().await;
    };
    tokio::select! {
        _ = tokio::io::copy(&mut ur, &mut cw) => {}
        () = up => {}
    }
    let _ = cw.shutdown().await;
    if guard.is_cut() {
        tracing::warn!(%program, %path, "tunnel cut: the instance was stopped at max_wait");
        guard.fail();
    }
}

/// Tells the connection's [`framing::Gate`] how an Upgrade or CONNECT
/// request was answered, when its handling ends (however it ends).
struct Decision<'a> {
    gate: Option<&'a framing::Gate>,
    tunnel: bool,
}

impl Drop for Decision<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.gate {
            g.decide(self.tunnel);
        }
    }
}

async fn handle(
    req: Request<Incoming>,
    peer: &Option<HeaderValue>,
    shared: &Shared,
    gate: &framing::Gate,
) -> Response<ProxyBody> {
    // The framing reader holds back what follows an Upgrade or CONNECT
    // request until this says whether it is a tunnel's.
    let switching = req.headers().contains_key(header::UPGRADE) || req.method() == Method::CONNECT;
    let mut decision = Decision {
        gate: switching.then_some(gate),
        tunnel: false,
    };
    if shared.draining.load(Ordering::SeqCst) {
        return unavailable(shared);
    }
    let path_and_query = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
    let path = path_and_query.as_str();
    let connect = req.method() == Method::CONNECT;
    let mut req = req;
    // An Upgrade (WebSocket) request keeps its Upgrade header and, on 101,
    // becomes a tunnel that counts as in flight until it closes.
    let upgrade = req.headers().get(header::UPGRADE).cloned();
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(u) = &upgrade {
        parts.headers.insert(header::UPGRADE, u.clone());
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if shared.options.forward_headers {
        if let Some(ip) = peer {
            let xff = match parts
                .headers
                .get(&X_FORWARDED_FOR)
                .map(HeaderValue::as_bytes)
            {
                Some(prev) => {
                    let mut v = Vec::with_capacity(prev.len() + 2 + ip.len());
                    v.extend_from_slice(prev);
                    v.extend_from_slice(b", ");
                    v.extend_from_slice(ip.as_bytes());
                    HeaderValue::from_bytes(&v).ok()
                }
                None => Some(ip.clone()),
            };
            if let Some(v) = xff {
                parts.headers.insert(X_FORWARDED_FOR, v);
            }
            parts.headers.insert(X_REAL_IP, ip.clone());
        }
        parts
            .headers
            .insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    // The client's request goes upstream as it is, head and body: only the
    // headers above change, an absolute-form target becomes origin-form, and
    // a request without Host gets the instance's address.
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        parts.uri = hyper::Uri::from(path_and_query.clone());
    }
    parts.version = hyper::Version::HTTP_11;
    parts.extensions.clear();
    let host_given = parts.headers.contains_key(header::HOST);
    let (body, body_state) = body::RequestBody::new(body, shared.options.body_timeout);
    let mut req = Request::from_parts(parts, body);
    let mut tried: Vec<PrivateAddr> = Vec::new();
    let mut pin = canary::Pin::default();
    loop {
        let (up, mut guard) = match route(shared, &tried, &mut pin, req.headers()).await {
            Ok(routed) => routed,
            Err(Refused::Closed(why)) => return closed(shared, &why),
            Err(Refused::NoInstance) if tried.is_empty() => return unavailable(shared),
            Err(Refused::NoInstance) => {
                return text(
                    StatusCode::BAD_GATEWAY,
                    "502 Bad Gateway: no instance could be reached\n".into(),
                )
            }
        };
        if !tried.is_empty() {
            shared.traffic.stats.resend();
        }
        if !host_given {
            req.headers_mut().insert(header::HOST, up.authority.clone());
        }
        let sending = up.pool.send(req, shared.options.upstream_idle_timeout);
        // response_timeout runs from the moment the whole body went upstream.
        let no_answer = async {
            body_state.ended().await;
            tokio::time::sleep(shared.options.response_timeout).await;
        };
        let sent = tokio::select! {
            r = sending => r,
            () = no_answer => {
                guard.fail();
                tracing::warn!(program = %shared.program, upstream = %up.addr, %path, "no answer within response_timeout; answered 504");
                let mut resp = text(
                    StatusCode::GATEWAY_TIMEOUT,
                    "504 Gateway Timeout: the application did not answer within response_timeout\n".into(),
                );
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return resp;
            }
        };
        match sent {
            Ok((mut resp, lease)) => {
                guard.status(resp.status().as_u16());
                if let Some(v) = pin
                    .set_cookie(&up)
                    .and_then(|c| HeaderValue::from_str(&c).ok())
                {
                    resp.headers_mut().append(header::SET_COOKIE, v);
                }
                // hyper hands a CONNECT answered 2xx over as upgraded.
                decision.tunnel = resp.status() == StatusCode::SWITCHING_PROTOCOLS
                    || (connect && resp.status().is_success());
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(client) = client_upgrade {
                        let upstream = hyper::upgrade::on(&mut resp);
                        // Counted as an open client connection (and on this
                        // thread's load) until it closes.
                        let open = shared.workers.open_on(workers::current());
                        tokio::spawn(tunnel(
                            client,
                            upstream,
                            guard,
                            shared.program.clone(),
                            path.to_string(),
                            open,
                        ));
                        // The connection is the tunnel now, never pooled again.
                        drop(lease);
                        let (rparts, _) = resp.into_parts();
                        return Response::from_parts(
                            rparts,
                            Empty::new().map_err(|never| match never {}).boxed(),
                        );
                    }
                }
                let (mut rparts, rbody) = resp.into_parts();
                strip_hop_by_hop(&mut rparts.headers);
                return Response::from_parts(
                    rparts,
                    GuardedBody::new(rbody, guard, lease, body_state).boxed(),
                );
            }
            // Not one byte reached the app, and the request came back whole
            // (its body too): try another instance.
            Err(pool::SendError::Connect(cause, unsent)) => {
                tracing::warn!(program = %shared.program, upstream = %up.addr, %cause, "connect failed; trying another instance");
                shared.traffic.stats.connect_error();
                guard.discard();
                tried.push(up.addr.clone());
                req = *unsent;
            }
            Err(pool::SendError::Upstream(e)) => {
                // The client's doing, not the upstream's: its body stopped.
                match body_state.failed() {
                    body::CLIENT_SILENT => {
                        guard.abandon();
                        tracing::info!(program = %shared.program, %path, "client sent no request body for body_timeout; answered 408");
                        let mut resp = text(
                            StatusCode::REQUEST_TIMEOUT,
                            "408 Request Timeout: no request body within body_timeout\n".into(),
                        );
                        resp.headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                        return resp;
                    }
                    body::CLIENT_GONE => {
                        guard.abandon();
                        tracing::debug!(program = %shared.program, %path, "client closed during the request body");
                        return text(
                            StatusCode::BAD_REQUEST,
                            "400 Bad Request: the request body broke off\n".into(),
                        );
                    }
                    _ => {}
                }
                guard.fail();
                if guard.is_cut() {
                    tracing::warn!(program = %shared.program, upstream = %up.addr, %path, "request cut: the instance was stopped at max_wait; answered 502");
                } else {
                    tracing::warn!(program = %shared.program, upstream = %up.addr, %path, cause = %e, "upstream failed; answered 502");
                }
                drop(guard);
                return text(
                    StatusCode::BAD_GATEWAY,
                    "502 Bad Gateway: the application failed to answer\n".into(),
                );
            }
        }
    }
}
