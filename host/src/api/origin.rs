//! Cross-site defences for the TCP listener: a web page the user opens must not be able to
//! drive the daemon on loopback.
//!
//! - **Host** (DNS rebinding): a request not authenticated by the API token must name a loopback
//!   host (`localhost`, `*.localhost`, `127.0.0.0/8`, `[::1]`) or one of `api_allowed_hosts`.
//!   A page on `attacker.com` whose name was re-pointed at 127.0.0.1 sends `Host: attacker.com`.
//! - **Origin**: a request that carries an `Origin` (browsers add it to every cross-origin
//!   request, to every POST and to WebSocket upgrades) must come from the daemon's own origin
//!   (the one its `Host` names) or from an allowed host. A foreign page's request, a `null`
//!   origin (sandboxed frames, `file://`) included, is refused whatever its method.
//! - **Content type**: every POST/PUT/PATCH must say `Content-Type: application/json`, even
//!   without a body, so no "simple" cross-site request (a form, `text/plain`, a bodiless
//!   `fetch`) can reach a route that changes anything: such a request needs a CORS preflight,
//!   which the daemon never grants.
//!
//! The Unix socket has none of these checks: no browser can reach it; its permissions guard it.

use axum::http::{HeaderMap, Method, StatusCode, header};

use super::ApiError;

/// A 403 with the API's error shape.
fn forbidden(code: &'static str, message: String) -> ApiError {
    ApiError {
        status: StatusCode::FORBIDDEN,
        code,
        message,
        field: None,
    }
}

/// The host name of a `Host` header value or of an origin's authority: `[::1]:8787` → `::1`,
/// `localhost:8787` → `localhost`, lower-cased.
fn host_name(authority: &str) -> String {
    let a = authority.trim();
    let name = if let Some(rest) = a.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        a.rsplit_once(':')
            .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
            .map_or(a, |(h, _)| h)
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether a host name can only mean this machine.
fn is_loopback_name(name: &str) -> bool {
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn allowed(name: &str, allowed_hosts: &[String]) -> bool {
    allowed_hosts.iter().any(|h| host_name(h) == name)
}

/// The `Host` check, for requests not authenticated by the token.
///
/// # Errors
/// 403 `host_not_allowed` naming the host and the setting that allows it.
pub fn check_host(headers: &HeaderMap, allowed_hosts: &[String]) -> Result<(), ApiError> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let name = host_name(host);
    if is_loopback_name(&name) || allowed(&name, allowed_hosts) {
        return Ok(());
    }
    Err(forbidden(
        "host_not_allowed",
        format!(
            "this daemon answers requests for loopback names (localhost, 127.0.0.1, [::1]) only, not for Host `{host}`: a page whose domain points at this machine (DNS rebinding) is refused. To reach it under another name (a reverse proxy), add that name to the daemon's api_allowed_hosts setting, or use the API token"
        ),
    ))
}

/// The `Origin` check, for every request over TCP.
///
/// # Errors
/// 403 `cross_origin` naming the origin.
pub fn check_origin(headers: &HeaderMap, allowed_hosts: &[String]) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("(not text)");
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .map(|a| a.trim_end_matches('/').to_ascii_lowercase());
    let ok = authority.is_some_and(|a| a == host || allowed(&host_name(&a), allowed_hosts));
    if ok {
        return Ok(());
    }
    Err(forbidden(
        "cross_origin",
        format!(
            "a request from the web page at origin `{origin}` is refused: only the daemon's own pages (its dashboard) may call it from a browser. To let pages of another host call it, add that host to the daemon's api_allowed_hosts setting"
        ),
    ))
}

/// The content-type check, for POST, PUT and PATCH.
///
/// # Errors
/// 415 `content_type`.
pub fn check_content_type(method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
    if ![Method::POST, Method::PUT, Method::PATCH].contains(method) {
        return Ok(());
    }
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let essence = ct.split(';').next().unwrap_or_default().trim();
    if essence.eq_ignore_ascii_case("application/json") {
        return Ok(());
    }
    Err(ApiError {
        status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
        code: "content_type",
        message: format!(
            "a {method} must say Content-Type: application/json (even without a body), not {}: this keeps web pages from sending it cross-site",
            if ct.is_empty() {
                "no content type".to_string()
            } else {
                format!("`{ct}`")
            }
        ),
        field: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn loopback_hosts_pass_and_others_need_the_allow_list() {
        for host in [
            "localhost",
            "localhost:8787",
            "127.0.0.1:8787",
            "127.1.2.3",
            "[::1]:8787",
            "ksi.localhost:80",
            "LOCALHOST.",
        ] {
            assert!(
                check_host(&headers(&[("host", host)]), &[]).is_ok(),
                "{host}"
            );
        }
        for host in ["attacker.com", "attacker.com:8787", "10.0.0.1:8787", ""] {
            let e = check_host(&headers(&[("host", host)]), &[]).unwrap_err();
            assert_eq!(e.code, "host_not_allowed", "{host}");
        }
        let list = vec!["ksi.example.com".to_string()];
        assert!(check_host(&headers(&[("host", "ksi.example.com:443")]), &list).is_ok());
    }

    #[test]
    fn only_the_daemons_own_origin_passes() {
        let own = headers(&[
            ("host", "127.0.0.1:8787"),
            ("origin", "http://127.0.0.1:8787"),
        ]);
        assert!(check_origin(&own, &[]).is_ok());
        assert!(check_origin(&headers(&[("host", "127.0.0.1:8787")]), &[]).is_ok());
        for origin in [
            "http://evil.example",
            "null",
            "http://127.0.0.1:9999",
            "http://localhost:8787",
            "file://",
        ] {
            let h = headers(&[("host", "127.0.0.1:8787"), ("origin", origin)]);
            assert_eq!(
                check_origin(&h, &[]).unwrap_err().code,
                "cross_origin",
                "{origin}"
            );
        }
        let list = vec!["ksi.example.com".to_string()];
        let h = headers(&[
            ("host", "127.0.0.1:8787"),
            ("origin", "https://ksi.example.com"),
        ]);
        assert!(check_origin(&h, &list).is_ok());
    }

    #[test]
    fn bodies_and_bodiless_posts_must_say_json() {
        let json = headers(&[("content-type", "application/json; charset=utf-8")]);
        assert!(check_content_type(&Method::POST, &json).is_ok());
        assert!(check_content_type(&Method::GET, &HeaderMap::new()).is_ok());
        assert!(check_content_type(&Method::DELETE, &HeaderMap::new()).is_ok());
        for ct in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
        ] {
            let e =
                check_content_type(&Method::POST, &headers(&[("content-type", ct)])).unwrap_err();
            assert_eq!(e.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct}");
        }
        assert!(check_content_type(&Method::PUT, &HeaderMap::new()).is_err());
    }
}
