//! Helpers shared by the end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Path of a binary of this package, built by cargo for the integration tests.
pub fn bin(name: &str) -> PathBuf {
    match name {
        "ksi-host" => PathBuf::from(env!("CARGO_BIN_EXE_ksi-host")),
        "ksi" => PathBuf::from(env!("CARGO_BIN_EXE_ksi")),
        "fake-claude" => PathBuf::from(env!("CARGO_BIN_EXE_fake-claude")),
        other => panic!("unknown binary {other}"),
    }
}

/// `ksi-host --data-dir DIR ARGS...`, run to completion.
pub fn ksi_host(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(bin("ksi-host"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("KSI_DATA_DIR")
        .output()
        .expect("run ksi-host")
}

/// Stdout and stderr as text, for assertion messages.
/// The live processes of group `pgid`, each as "pid: command line", for an assertion that none
/// is left and a message that says which one was.
pub fn group_leftovers(pgid: u32) -> Vec<String> {
    ksi_host::claude::orphan::group_members(pgid)
        .into_iter()
        .map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default();
            format!("{pid}: {}", cmdline.trim_end())
        })
        .collect()
}

pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// sha256 of a file's bytes (to prove it was left untouched).
pub fn file_digest(path: &Path) -> Vec<u8> {
    use std::hash::{Hash, Hasher};
    let bytes = std::fs::read(path).unwrap_or_default();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    let mut out = h.finish().to_le_bytes().to_vec();
    out.extend((bytes.len() as u64).to_le_bytes());
    out
}

/// A `ksi-host serve` running on a free loopback port, killed on drop.
pub struct Daemon {
    pub child: std::process::Child,
    pub port: u16,
    /// The API token of the data dir (its `api.token` when the daemon started), sent by
    /// [`Daemon::get`] and [`Daemon::post`].
    pub token: Option<String>,
}

impl Daemon {
    /// Starts the daemon on `dir` with fake-claude and waits until `/health` answers.
    pub async fn start(dir: &Path, extra_env: &[(&str, &str)]) -> Daemon {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = Command::new(bin("ksi-host"));
        cmd.arg("--data-dir")
            .arg(dir)
            .args(["--log-level", "warn", "serve", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--claude-bin")
            .arg(bin("fake-claude"))
            .env_remove("KSI_DATA_DIR")
            .stdout(std::process::Stdio::null());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start ksi-host serve");
        let token = std::fs::read_to_string(dir.join("api.token"))
            .ok()
            .map(|t| t.trim().to_string());
        let d = Daemon { child, port, token };
        for _ in 0..300 {
            if let Ok((200, _)) = d.get("/health").await {
                return d;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("the daemon did not become healthy on port {port}");
    }

    /// GET, returning (status, JSON body or {"text": ...}).
    pub async fn get(&self, path: &str) -> Result<(u16, serde_json::Value), String> {
        http_with(
            self.port,
            "GET",
            path,
            None,
            "application/json",
            self.token.as_deref(),
        )
        .await
    }

    /// POST a JSON body.
    pub async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(u16, serde_json::Value), String> {
        http_with(
            self.port,
            "POST",
            path,
            Some(body.to_string().into_bytes()),
            "application/json",
            self.token.as_deref(),
        )
        .await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request over a fresh connection (hyper).
pub async fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(u16, serde_json::Value), String> {
    http_raw(port, method, path, body, "application/json").await
}

/// Like [`http`], with an explicit content type.
pub async fn http_raw(
    port: u16,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    content_type: &str,
) -> Result<(u16, serde_json::Value), String> {
    http_with(port, method, path, body, content_type, None).await
}

/// Like [`http_raw`], with `Authorization: Bearer <bearer>` when given.
pub async fn http_with(
    port: u16,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    content_type: &str,
    bearer: Option<&str>,
) -> Result<(u16, serde_json::Value), String> {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", content_type);
    if let Some(t) = bearer {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req
        .body(Full::new(hyper::body::Bytes::from(
            body.unwrap_or_default(),
        )))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| serde_json::json!({ "text": String::from_utf8_lossy(&bytes) }));
    Ok((status, v))
}
