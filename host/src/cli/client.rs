//! How `ksi` reaches KSI: the running daemon over its Unix socket (`<data dir>/ksi.sock`, the
//! default), a daemon elsewhere over HTTP (`--url`, with a bearer token), or — when no daemon
//! runs and the command only reads — the same HTTP API served inside this process over the
//! local data dir. One [`DaemonClient`] API for all three: JSON requests and the live event
//! stream (Server-Sent Events), so every command has one code path and one JSON output.
//!
//! Remote use is plain `http://`: put the daemon behind a TLS-terminating proxy or an SSH
//! tunnel when the network is not trusted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use clap::Args;
use http_body_util::BodyExt;
use hyper::body::Bytes;
use serde_json::Value;

use crate::config::Config;

/// The flags of `ksi` that choose the daemon.
#[derive(Debug, Clone, Default, Args)]
pub struct ClientArgs {
    /// Talk to the daemon at this URL (plain http, e.g. http://host:8787) instead of the
    /// local data dir's Unix socket; the local database is then never opened
    #[arg(long, global = true, env = "KSI_URL", value_name = "URL")]
    pub url: Option<String>,
    /// API token sent as `Authorization: Bearer TOKEN` with --url (the daemon's
    /// `<data dir>/api.token`)
    #[arg(
        long,
        global = true,
        env = "KSI_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// Read the API token from this file (one line), e.g. a copy of the daemon's api.token;
    /// wins over --token and KSI_TOKEN
    #[arg(long, global = true, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
}

impl ClientArgs {
    /// The token to send: from `--token-file` when given (so a file named on the command line
    /// wins over a `KSI_TOKEN` in the environment), else `--token`/`KSI_TOKEN`.
    ///
    /// # Errors
    /// The token file cannot be read or is empty, or the token is blank.
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        let Some(path) = &self.token_file else {
            return match self.token.as_deref().map(str::trim) {
                Some("") => {
                    anyhow::bail!("--token (or KSI_TOKEN) is empty: pass the daemon's API token")
                }
                t => Ok(t.map(str::to_string)),
            };
        };
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "reading the token file {} (--token-file): copy the daemon's <data dir>/api.token there, or pass --token",
                path.display()
            )
        })?;
        let t = text.lines().next().unwrap_or("").trim();
        anyhow::ensure!(
            !t.is_empty(),
            "the token file {} is empty: it must hold the daemon's API token on its first line",
            path.display()
        );
        Ok(Some(t.to_string()))
    }
}

/// What a command needs to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Reads: the daemon when one runs, else the local data dir read in this process.
    Read,
    /// Changes that the daemon carries out (actions, publishing, schedules): a daemon.
    Daemon,
}

#[derive(Clone)]
enum Transport {
    Unix(PathBuf),
    Http {
        /// As given, for messages.
        url: String,
        /// `host:port`.
        authority: String,
        /// Path prefix of the daemon (usually empty).
        base: String,
        token: Option<String>,
    },
    /// The API router over the local data dir, served in this process.
    InProcess(axum::Router),
}

/// A client of one daemon (or of the local data dir's API, served in process).
#[derive(Clone)]
pub struct DaemonClient {
    transport: Transport,
}

impl std::fmt::Debug for DaemonClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// The message for a command that needs a daemon and finds none.
pub fn no_daemon_message(data_dir: &Path, command: &str) -> String {
    let dir = data_dir.display();
    format!(
        "no KSI daemon is running for the data dir {dir} (nothing answers on {dir}/ksi.sock), and `ksi {command}` needs one. \
         Start it with `ksi-host serve --data-dir {dir}` (or `systemctl start ksi-host` where it is installed as a service, see docs/deployment.md), \
         or reach a daemon elsewhere with --url URL"
    )
}

impl DaemonClient {
    /// The daemon of `data_dir`, if one is listening on its socket.
    pub async fn find(data_dir: &Path) -> Option<DaemonClient> {
        let socket = data_dir.join("ksi.sock");
        tokio::net::UnixStream::connect(&socket).await.ok()?;
        Some(DaemonClient {
            transport: Transport::Unix(socket),
        })
    }

    /// A daemon at `url` (`http://host:port[/prefix]`), authenticated with `token` when given.
    ///
    /// # Errors
    /// The URL is not a plain `http://` URL with a host.
    pub fn remote(url: &str, token: Option<String>) -> anyhow::Result<DaemonClient> {
        let uri: hyper::Uri = url.parse().map_err(|e| {
            anyhow::anyhow!("--url {url:?} is not a URL ({e}); use e.g. http://127.0.0.1:8787")
        })?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => anyhow::bail!(
                "--url {url:?}: ksi speaks plain http only; reach a TLS-protected daemon through an SSH tunnel \
                 (ssh -L 8787:127.0.0.1:8787 HOST, then --url http://127.0.0.1:8787)"
            ),
            _ => anyhow::bail!("--url {url:?} must start with http://, e.g. http://127.0.0.1:8787"),
        }
        let Some(authority) = uri.authority() else {
            anyhow::bail!("--url {url:?} has no host; use e.g. http://127.0.0.1:8787");
        };
        let authority = if authority.port().is_some() {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(DaemonClient {
            transport: Transport::Http {
                url: url.to_string(),
                authority,
                base: uri.path().trim_end_matches('/').to_string(),
                token,
            },
        })
    }

    /// The API of the local data dir, served in this process (no daemon runs).
    pub fn in_process(router: axum::Router) -> DaemonClient {
        DaemonClient {
            transport: Transport::InProcess(router),
        }
    }

    /// Whether requests reach a daemon (as opposed to the data dir read in this process).
    pub fn is_daemon(&self) -> bool {
        !matches!(self.transport, Transport::InProcess(_))
    }

    /// Whether this is a daemon reached over `--url`.
    pub fn is_remote(&self) -> bool {
        matches!(self.transport, Transport::Http { .. })
    }

    /// Where requests go, for messages.
    pub fn describe(&self) -> String {
        match &self.transport {
            Transport::Unix(s) => format!("the daemon on {}", s.display()),
            Transport::Http { url, .. } => format!("the daemon at {url}"),
            Transport::InProcess(_) => "the local data dir (no daemon running)".into(),
        }
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<hyper::Response<Body>> {
        let builder = hyper::Request::builder()
            .method(method)
            .header("content-type", "application/json");
        let bytes = Bytes::from(body.map(|b| b.to_string()).unwrap_or_default());
        match &self.transport {
            Transport::Unix(socket) => {
                let stream = tokio::net::UnixStream::connect(socket)
                    .await
                    .with_context(|| {
                        format!(
                            "connecting to the daemon at {} (did it stop? start it with `ksi-host serve`)",
                            socket.display()
                        )
                    })?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await?;
                tokio::spawn(conn);
                let req = builder
                    .uri(path)
                    .header("host", "ksi")
                    .body(http_body_util::Full::new(bytes))?;
                Ok(sender.send_request(req).await?.map(Body::new))
            }
            Transport::Http {
                url,
                authority,
                base,
                token,
            } => {
                let stream = tokio::net::TcpStream::connect(authority.as_str())
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "cannot reach the KSI daemon at {url} ({e}). Is it running there? Start it on that machine with \
                             `ksi-host serve --listen ADDR` (a non-loopback address needs <data dir>/api.token), or fix --url / KSI_URL"
                        )
                    })?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await?;
                tokio::spawn(conn);
                let mut builder = builder
                    .uri(format!("{base}{path}"))
                    .header("host", authority);
                if let Some(t) = token {
                    builder = builder.header("authorization", format!("Bearer {t}"));
                }
                let req = builder.body(http_body_util::Full::new(bytes))?;
                let resp = sender
                    .send_request(req)
                    .await
                    .with_context(|| format!("{method} {path} on the daemon at {url}"))?;
                Ok(resp.map(Body::new))
            }
            Transport::InProcess(router) => {
                use tower::ServiceExt;
                let req = builder.uri(path).body(Body::from(bytes))?;
                Ok(router.clone().oneshot(req).await?)
            }
        }
    }

    /// One JSON request; returns the status and the JSON body (`null` when it is not JSON).
    ///
    /// # Errors
    /// The daemon cannot be reached.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    /// One JSON request that must succeed; returns the body of the 2xx answer.
    ///
    /// # Errors
    /// The daemon cannot be reached, or it answered with an error: the message is the
    /// daemon's own (`{"error": {"message"}}`), and a 401 says how to pass the token.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let (status, b) = self.request(method, path, body).await?;
        if (200..300).contains(&status) {
            return Ok(b);
        }
        Err(self.error_of(status, &b))
    }

    fn error_of(&self, status: u16, b: &Value) -> anyhow::Error {
        let message = b["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| b.to_string());
        if status == 401 {
            return anyhow::anyhow!(
                "{} refused the request (401: {message}). Pass its API token with --token TOKEN, --token-file PATH or KSI_TOKEN \
                 (it is the file <data dir>/api.token on the daemon's machine)",
                self.describe()
            );
        }
        anyhow::anyhow!("{message}")
    }

    /// GET returning the JSON body of a 2xx answer.
    ///
    /// # Errors
    /// As [`DaemonClient::call`].
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call("GET", path, None).await
    }

    /// Opens a Server-Sent Events stream.
    ///
    /// # Errors
    /// The daemon cannot be reached or refused the stream.
    pub async fn stream(&self, path: &str) -> anyhow::Result<EventStream> {
        let resp = self.send("GET", path, None).await?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            let bytes = resp.into_body().collect().await?.to_bytes();
            let b = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Err(self.error_of(status, &b));
        }
        Ok(EventStream {
            body: resp.into_body(),
            buf: Vec::new(),
        })
    }
}

/// Percent-encodes a value for a URL query or path segment.
pub fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// How a `ksi` command reaches KSI (see [`Need`]): `--url` → that daemon (nothing local is
/// opened); else the daemon on the data dir's socket; else, for reads, the data dir itself.
///
/// # Errors
/// A bad `--url`/token, no daemon for a command that needs one (the message says how to
/// start it), or a data dir that cannot be opened.
pub async fn connect(
    args: &ClientArgs,
    config: &Config,
    need: Need,
    command: &str,
) -> anyhow::Result<DaemonClient> {
    if let Some(c) = find_daemon(args, config).await? {
        return Ok(c);
    }
    if args.url.is_none()
        && let Some(c) = wait_for_starting_daemon(&config.data_dir).await?
    {
        return Ok(c);
    }
    match need {
        Need::Daemon => anyhow::bail!("{}", no_daemon_message(&config.data_dir, command)),
        Need::Read => {
            // This process now holds the data dir, so no daemon starts beside its executor
            // (a `/spawn` runs the CLI here). The lock lives as long as the command.
            let lock = crate::daemon::DataDirLock::acquire(&config.data_dir)?;
            std::mem::forget(lock);
            Ok(DaemonClient::in_process(local_api(config.clone()).await?))
        }
    }
}

/// How long a client waits for a daemon that holds the data dir but does not answer on its
/// socket yet (it is starting): `KSI_DAEMON_START_WAIT_SECS`, default 30.
fn start_wait() -> Duration {
    Duration::from_secs(
        std::env::var("KSI_DAEMON_START_WAIT_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(30),
    )
}

/// When another process holds `data_dir` (a daemon that is starting), waits for its socket
/// (bounded, saying so on stderr) and returns a client of it. `None` when nobody holds the
/// data dir: the caller may open it itself.
///
/// # Errors
/// The holder did not answer on its socket in time: the message names it and what to do. A
/// second executor never runs on a data dir another process holds.
pub async fn wait_for_starting_daemon(data_dir: &Path) -> anyhow::Result<Option<DaemonClient>> {
    let Some(pid) = crate::daemon::DataDirLock::holder(data_dir) else {
        return Ok(None);
    };
    let wait = start_wait();
    eprintln!(
        "waiting up to {} s for the KSI daemon (pid {pid}) that is starting on {} ...",
        wait.as_secs(),
        data_dir.display()
    );
    let deadline = std::time::Instant::now() + wait;
    loop {
        if let Some(c) = DaemonClient::find(data_dir).await {
            return Ok(Some(c));
        }
        if crate::daemon::DataDirLock::holder(data_dir).is_none() {
            // It stopped (or was a short command): the data dir is free again.
            return Ok(None);
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!(
                "another KSI process (pid {pid}) holds the data directory {} but did not answer on {} within {} s. If it is a daemon, wait until it has started (or check its log); if it is a `ksi run`, let it finish. Nothing was run",
                data_dir.display(),
                data_dir.join("ksi.sock").display(),
                wait.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The daemon to talk to, if any: `--url`, else the one on the data dir's socket.
///
/// # Errors
/// A bad `--url` or token file.
pub async fn find_daemon(
    args: &ClientArgs,
    config: &Config,
) -> anyhow::Result<Option<DaemonClient>> {
    if let Some(url) = &args.url {
        return Ok(Some(DaemonClient::remote(url, args.token()?)?));
    }
    Ok(DaemonClient::find(&config.data_dir).await)
}

/// The daemon's HTTP API over the local data dir, for use in this process: the store, the
/// engine (definitions loaded, no step runs) and the executor (a `/spawn` runs the Claude CLI
/// here). Plugins are not loaded, so `/plugins` is not served.
///
/// # Errors
/// The data dir cannot be opened.
pub async fn local_api(config: Config) -> anyhow::Result<axum::Router> {
    use crate::api;
    let o = super::open(config)?;
    let engine = super::workflow::admin_engine(&o).await?;
    let executor = super::claude::executor(&o, crate::claude::ExecutorConfig::default());
    let state = api::AppState {
        store: o.store.clone(),
        bus: o.bus.clone(),
        refs: o.refs.clone(),
        engine,
        started: std::time::Instant::now(),
        fanout: api::events::Fanout::new(o.store.clone(), o.bus.clone()),
        data_dir: o.config.data_dir.clone(),
        parts: std::sync::Arc::new(vec![
            std::sync::Arc::new(api::claude::ExecutorPart(executor))
                as std::sync::Arc<dyn api::ApiPart>,
        ]),
    };
    Ok(api::router(state))
}

/// The events of an SSE stream, one JSON value each.
pub struct EventStream {
    body: Body,
    buf: Vec<u8>,
}

impl EventStream {
    /// The next event's `data` as JSON; `None` when the daemon closed the stream.
    ///
    /// # Errors
    /// The connection broke or an event is not JSON.
    pub async fn next_event(&mut self) -> anyhow::Result<Option<Value>> {
        loop {
            // An event ends with a blank line; its `data:` lines hold the JSON.
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&block);
                let data: String = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:").map(|d| d.trim_start()))
                    .collect::<Vec<_>>()
                    .join("\n");
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                return Ok(Some(serde_json::from_str(&data)?));
            }
            match self.body.frame().await {
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                None => return Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_urls_with_a_host_are_accepted() {
        assert!(DaemonClient::remote("http://127.0.0.1:8787", None).is_ok());
        let e = DaemonClient::remote("https://example.org", None).unwrap_err();
        assert!(e.to_string().contains("plain http"), "{e}");
        let e = DaemonClient::remote("ftp://x", None).unwrap_err();
        assert!(e.to_string().contains("http://"), "{e}");
        let e = DaemonClient::remote("not a url", None).unwrap_err();
        assert!(e.to_string().contains("not a URL"), "{e}");
    }

    #[test]
    fn a_url_without_port_uses_80_and_keeps_its_path_prefix() {
        let c = DaemonClient::remote("http://ksi.example/api/", None).unwrap();
        match c.transport {
            Transport::Http {
                authority, base, ..
            } => {
                assert_eq!(authority, "ksi.example:80");
                assert_eq!(base, "/api");
            }
            _ => panic!("not http"),
        }
    }

    #[test]
    fn the_token_file_gives_its_first_line_and_an_empty_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t");
        std::fs::write(&f, "s3cret\n").unwrap();
        let a = ClientArgs {
            token_file: Some(f.clone()),
            ..ClientArgs::default()
        };
        assert_eq!(a.token().unwrap().as_deref(), Some("s3cret"));
        let both = ClientArgs {
            token: Some("from-env".into()),
            ..a.clone()
        };
        assert_eq!(
            both.token().unwrap().as_deref(),
            Some("s3cret"),
            "the file wins"
        );
        std::fs::write(&f, "\n").unwrap();
        assert!(a.token().unwrap_err().to_string().contains("is empty"));
        let a = ClientArgs {
            token_file: Some(dir.path().join("missing")),
            ..ClientArgs::default()
        };
        assert!(a.token().unwrap_err().to_string().contains("--token-file"));
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode("workflow.>"), "workflow.%3E");
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
    }
}
