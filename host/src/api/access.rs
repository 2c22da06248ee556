//! Who may call the API, how often, and the record of what they changed: one middleware in
//! front of every route, per listener.
//!
//! - **Token** ([`super::token`]): over TCP, when `<data dir>/api.token` exists, a request
//!   must carry `Authorization: Bearer <token>` (the live stream also takes
//!   `?access_token=`, because a browser's `EventSource`/`WebSocket` cannot set headers).
//!   `GET /health` and the dashboard page `GET /` (static, it holds no data) stay open.
//!   The Unix socket is trusted: its file permissions guard it.
//! - **Rate limit**: a token bucket per client (`governor`): a client is its token, else its
//!   peer IP; the Unix socket is one client. Excess requests get 429 with `Retry-After`.
//! - **Audit**: every POST/PUT/PATCH/DELETE, answered or refused, is handed to the
//!   [`AuditLog`] (who, what, status, the resource it touched, a body summary, when).

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::body::{Body, to_bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota};
use serde_json::Value;

use super::origin;
use super::token::{TokenFile, Verdict};
use super::{ApiError, MAX_BODY_BYTES};
use crate::audit::{AuditEntry, AuditLog};
use crate::store::now_ms;

/// Largest response body read to find the id of the resource a mutating call touched.
const MAX_AUDITED_RESPONSE: usize = 256 * 1024;
/// Longest body summary kept in the audit log.
const MAX_SUMMARY_CHARS: usize = 300;

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// TCP; `beyond_loopback` when the daemon listens on a non-loopback address (then a
    /// missing token file refuses every request instead of opening the API).
    Tcp { beyond_loopback: bool },
    /// The Unix socket in the data dir.
    Unix,
}

/// Per-client token buckets.
pub struct RateLimit {
    limiter: DefaultKeyedRateLimiter<String>,
    per_s: u32,
    burst: u32,
    checks: AtomicU64,
}

impl RateLimit {
    /// `per_s` requests per second with bursts of `burst`; `None` when `per_s` is 0 (off).
    pub fn new(per_s: u32, burst: u32) -> Option<Arc<RateLimit>> {
        let rate = NonZeroU32::new(per_s)?;
        let b = NonZeroU32::new(burst).unwrap_or(rate);
        Some(Arc::new(RateLimit {
            limiter: DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(b)),
            per_s,
            burst: b.get(),
            checks: AtomicU64::new(0),
        }))
    }

    /// `Ok` when `client` may make a request now, else how long it must wait.
    fn check(&self, client: &str) -> Result<(), std::time::Duration> {
        // Forget idle clients now and then, so peers that came and went do not pile up.
        if self.checks.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&client.to_string())
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }
}

/// What the middleware of one listener needs.
#[derive(Clone)]
pub struct Access {
    pub listener: Listener,
    pub token: Arc<TokenFile>,
    pub rate: Option<Arc<RateLimit>>,
    pub audit: AuditLog,
    /// Host names besides loopback ones the TCP listener answers for, and whose pages may call
    /// it (`api_allowed_hosts`; see [`super::origin`]).
    pub allowed_hosts: Arc<Vec<String>>,
}

impl Access {
    /// Puts the middleware in front of every route of `app`.
    pub fn wrap(self, app: axum::Router) -> axum::Router {
        app.layer(axum::middleware::from_fn_with_state(Arc::new(self), guard))
    }
}

/// Routes that need no token: the liveness probe and the (data-free) dashboard page.
fn open_route(method: &Method, path: &str) -> bool {
    method == Method::GET && (path == "/health" || path == "/")
}

fn mutating(method: &Method) -> bool {
    [Method::POST, Method::PUT, Method::PATCH, Method::DELETE].contains(method)
}

/// The token a request presents: the `Authorization: Bearer` header, or, for the live
/// stream only, the `access_token` query parameter (which is then removed from the URI, so
/// the route never sees it and the audit log never stores it).
///
/// The scheme is case-insensitive (`bearer` works, as RFC 9110 says). With no token configured
/// (`open`), an `Authorization` header that is not a Bearer token (a proxy's `Basic`, say) is
/// ignored rather than refused: there is nothing for it to prove.
fn presented_token(req: &mut Request, open: bool) -> Result<Option<String>, ApiError> {
    if let Some(h) = req.headers().get(header::AUTHORIZATION) {
        let value = h.to_str().unwrap_or_default().trim();
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        let token = rest.trim();
        return match (
            scheme.eq_ignore_ascii_case("bearer") && !token.is_empty(),
            open,
        ) {
            (true, _) => Ok(Some(token.to_string())),
            (false, true) => Ok(None),
            (false, false) => Err(unauthorized(
                "bad_authorization",
                "the Authorization header must be `Bearer <token>`".into(),
            )),
        };
    }
    if req.uri().path() != "/events/stream" {
        return Ok(None);
    }
    let Some(query) = req.uri().query() else {
        return Ok(None);
    };
    let mut token = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| match kv.strip_prefix("access_token=") {
            Some(t) => {
                token = Some(percent_decode(t));
                false
            }
            None => true,
        })
        .collect();
    if token.is_some() {
        let path = req.uri().path();
        let uri = if kept.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{}", kept.join("&"))
        };
        if let Ok(u) = uri.parse() {
            *req.uri_mut() = u;
        }
    }
    Ok(token)
}

/// Decodes `%XX` escapes and `+` (tokens are hex, but a client may escape anything).
fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn unauthorized(code: &'static str, message: String) -> ApiError {
    ApiError {
        status: StatusCode::UNAUTHORIZED,
        code,
        message,
        field: None,
    }
}

const HOW_TO_PASS: &str = "send the header `Authorization: Bearer <token>` (the token is the file api.token in the daemon's data dir; `ksi-host token show` prints it). The live stream also accepts ?access_token=<token>, and the dashboard ?token=<token> on its URL";

/// Who is calling, and whether they may.
struct Caller {
    /// For the audit log: `unix socket`, a token id, `anonymous`, or the peer IP of a request
    /// without a valid token.
    client: String,
    /// Whose bucket the request takes from: the token id, else the peer IP (`unix socket`
    /// for the socket).
    rate_key: String,
    /// Why the request is refused, if it is.
    refusal: Option<ApiError>,
    /// Over TCP without a token configured: the `Host` must be a loopback (or allowed) name.
    check_host: bool,
}

fn identify(access: &Access, req: &mut Request, peer: Option<SocketAddr>) -> Caller {
    let beyond_loopback = match access.listener {
        Listener::Unix => {
            return Caller {
                client: "unix socket".into(),
                rate_key: "unix socket".into(),
                refusal: None,
                check_host: false,
            };
        }
        Listener::Tcp { beyond_loopback } => beyond_loopback,
    };
    let ip = peer.map_or_else(|| "unknown".to_string(), |p| p.ip().to_string());
    let open = open_route(req.method(), req.uri().path());
    let refused = |refusal: ApiError| Caller {
        client: ip.clone(),
        rate_key: ip.clone(),
        refusal: (!open).then_some(refusal),
        check_host: false,
    };
    let configured = !matches!(access.token.verify(None), Verdict::Open);
    let presented = match presented_token(req, !configured) {
        Ok(p) => p,
        Err(e) => return refused(e),
    };
    match access.token.verify(presented.as_deref()) {
        Verdict::Valid(id) => Caller {
            client: id.clone(),
            rate_key: id,
            refusal: None,
            check_host: false,
        },
        Verdict::Open if beyond_loopback => refused(unauthorized(
            "token_missing",
            format!(
                "the daemon listens beyond loopback but its token file {} is gone; create one with `ksi-host token rotate`",
                access.token.path().display()
            ),
        )),
        Verdict::Open => Caller {
            client: "anonymous".into(),
            rate_key: ip.clone(),
            refusal: None,
            check_host: true,
        },
        Verdict::Missing => refused(unauthorized(
            "token_required",
            format!("this daemon requires its API token: {HOW_TO_PASS}"),
        )),
        Verdict::Wrong => refused(unauthorized(
            "token_wrong",
            format!("the API token is wrong (it may have been rotated): {HOW_TO_PASS}"),
        )),
        Verdict::Broken(m) => refused(unauthorized("token_unusable", m)),
    }
}

/// The middleware.
async fn guard(State(access): State<Arc<Access>>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let at = now_ms();
    let method = req.method().clone();
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);

    let Caller {
        client,
        rate_key,
        refusal,
        check_host,
    } = identify(&access, &mut req, peer);
    // A browser's cross-site request is refused before anything else looks at it; then the
    // token; then a POST that does not say it is JSON.
    let refusal = {
        let h = req.headers();
        let tcp = matches!(access.listener, Listener::Tcp { .. });
        let cross_site = if check_host {
            origin::check_host(h, &access.allowed_hosts).err()
        } else {
            None
        }
        .or_else(|| {
            tcp.then(|| origin::check_origin(h, &access.allowed_hosts).err())
                .flatten()
        });
        cross_site
            .or(refusal)
            .or_else(|| origin::check_content_type(&method, h).err())
    };
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_string(), |p| p.to_string());

    // Rate limit before anything else is done for the request (refused ones count too, so
    // guessing tokens is as slow as everything else).
    let limited = access.rate.as_ref().and_then(|r| {
        r.check(&rate_key).err().map(|wait| {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            let mut resp = ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                code: "rate_limited",
                message: format!(
                    "too many requests from {client}: the limit is {} per second with bursts of {}; retry after {secs} s (the daemon's api_rate_per_s and api_rate_burst settings raise it)",
                    r.per_s, r.burst
                ),
                field: None,
            }
            .into_response();
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            resp
        })
    });

    let audited = mutating(&method);
    let (response, summary) = match (limited, refusal) {
        (Some(resp), _) => (resp, None),
        (None, Some(err)) => (err.into_response(), None),
        (None, None) if !audited => (next.run(req).await, None),
        (None, None) => {
            // Read the body once for its summary and hand it on unchanged.
            let (parts, body) = req.into_parts();
            match to_bytes(body, MAX_BODY_BYTES).await {
                Ok(bytes) => {
                    let summary = summarize(&bytes);
                    let req = Request::from_parts(parts, Body::from(bytes));
                    (next.run(req).await, summary)
                }
                Err(_) => (
                    ApiError {
                        status: StatusCode::PAYLOAD_TOO_LARGE,
                        code: "body_too_large",
                        message: format!("the body is larger than {MAX_BODY_BYTES} bytes"),
                        field: None,
                    }
                    .into_response(),
                    None,
                ),
            }
        }
    };
    if !audited {
        return response;
    }
    let (response, resource) = resource_of(response, &path).await;
    access.audit.record(AuditEntry {
        at,
        client,
        peer: peer.map(|p| p.to_string()),
        method: method.to_string(),
        path,
        status: response.status().as_u16(),
        resource,
        summary,
        duration_ms: started.elapsed().as_millis() as i64,
    });
    response
}

/// A short, readable summary of a request body: JSON with long strings cut, at most
/// [`MAX_SUMMARY_CHARS`] characters.
fn summarize(bytes: &[u8]) -> Option<String> {
    if bytes.is_empty() {
        return None;
    }
    let text = match serde_json::from_slice::<Value>(bytes) {
        Ok(mut v) => {
            shorten(&mut v);
            v.to_string()
        }
        Err(_) => format!("({} bytes, not JSON)", bytes.len()),
    };
    Some(crate::cli::ellipsize(&text, MAX_SUMMARY_CHARS))
}

fn shorten(v: &mut Value) {
    match v {
        Value::String(s) if s.chars().count() > 60 => {
            *s = crate::cli::ellipsize(s, 60);
        }
        Value::Array(a) => a.iter_mut().for_each(shorten),
        Value::Object(o) => o.values_mut().for_each(shorten),
        _ => {}
    }
}

/// The id the answer names (`id`, `process_id` or `workflow_id`), reading a JSON response
/// body (and putting it back); else the `{id}` segment of the path.
async fn resource_of(response: Response, path: &str) -> (Response, Option<String>) {
    let from_path = || {
        let p = path.split('?').next().unwrap_or_default();
        let segs: Vec<&str> = p.split('/').filter(|s| !s.is_empty()).collect();
        (segs.len() >= 2).then(|| segs[1].to_string())
    };
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let small = axum::body::HttpBody::size_hint(response.body())
        .upper()
        .is_some_and(|n| n <= MAX_AUDITED_RESPONSE as u64);
    if !is_json || !small || !response.status().is_success() {
        return (response, from_path());
    }
    let (parts, body) = response.into_parts();
    match to_bytes(body, MAX_AUDITED_RESPONSE).await {
        Ok(bytes) => {
            let id = serde_json::from_slice::<Value>(&bytes).ok().and_then(|v| {
                ["id", "process_id", "workflow_id"]
                    .iter()
                    .find_map(|k| match &v[*k] {
                        Value::String(s) => Some(s.clone()),
                        Value::Number(n) => {
                            let first = path.trim_start_matches('/').split(['/', '?']).next();
                            Some(format!("{}:{n}", first.unwrap_or("id")))
                        }
                        _ => None,
                    })
            });
            (
                Response::from_parts(parts, Body::from(bytes)),
                id.or_else(from_path),
            )
        }
        // An in-memory body that fails to read: nothing is left to send but the failure.
        Err(e) => (
            ApiError::internal(format!("reading the answer failed: {e}")).into_response(),
            from_path(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_escapes_decode_and_stray_percents_stay() {
        assert_eq!(percent_decode("a%2Fb%zz%4"), "a/b%zz%4");
    }

    #[test]
    fn summaries_cut_long_values_and_name_non_json() {
        let long = "x".repeat(500);
        let s =
            summarize(format!(r#"{{"prompt": "{long}", "agent": "alice"}}"#).as_bytes()).unwrap();
        assert!(s.contains("\"agent\":\"alice\""), "{s}");
        assert!(s.chars().count() < 120, "{s}");
        assert_eq!(summarize(b"\x00\x01").unwrap(), "(2 bytes, not JSON)");
        assert_eq!(summarize(b""), None);
    }

    #[test]
    fn access_token_is_taken_from_the_stream_query_and_removed() {
        let mut req = Request::builder()
            .uri("/events/stream?topic=%3E&access_token=ab%2Bc&named=false")
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            presented_token(&mut req, false).unwrap().as_deref(),
            Some("ab+c")
        );
        assert_eq!(
            req.uri().to_string(),
            "/events/stream?topic=%3E&named=false"
        );
        // Elsewhere the query parameter is not a way in.
        let mut req = Request::builder()
            .uri("/workflows?access_token=x")
            .body(Body::empty())
            .unwrap();
        assert_eq!(presented_token(&mut req, false).unwrap(), None);
    }

    #[test]
    fn a_malformed_authorization_header_is_refused_with_the_expected_form() {
        let mut req = Request::builder()
            .uri("/workflows")
            .header("authorization", "Token abc")
            .body(Body::empty())
            .unwrap();
        let e = presented_token(&mut req, false).unwrap_err();
        assert!(e.message.contains("Bearer <token>"), "{}", e.message);
        // Without a token configured there is nothing to prove: the header is ignored.
        let mut req = Request::builder()
            .uri("/workflows")
            .header("authorization", "Basic dXNlcjpwYXNz")
            .body(Body::empty())
            .unwrap();
        assert_eq!(presented_token(&mut req, true).unwrap(), None);
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for h in ["Bearer abc", "bearer abc", "BEARER  abc "] {
            let mut req = Request::builder()
                .uri("/workflows")
                .header("authorization", h)
                .body(Body::empty())
                .unwrap();
            assert_eq!(
                presented_token(&mut req, false).unwrap().as_deref(),
                Some("abc"),
                "{h}"
            );
        }
    }

    #[test]
    fn the_bucket_refuses_past_its_burst_and_says_how_long_to_wait() {
        let r = RateLimit::new(1, 2).unwrap();
        assert!(r.check("a").is_ok());
        assert!(r.check("a").is_ok());
        let wait = r.check("a").unwrap_err();
        assert!(wait.as_millis() > 0 && wait.as_secs() <= 1, "{wait:?}");
        assert!(r.check("b").is_ok(), "another client has its own bucket");
        assert!(RateLimit::new(0, 10).is_none(), "0 turns the limit off");
    }
}
