//! Talking to a running daemon over its Unix socket (`<data dir>/ksi.sock`): JSON requests
//! and the live event stream (Server-Sent Events).

use std::path::{Path, PathBuf};

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use serde_json::Value;

/// A client of the daemon of one data dir.
#[derive(Debug, Clone)]
pub struct DaemonClient {
    socket: PathBuf,
}

async fn connect(
    socket: &Path,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to the daemon at {}", socket.display()))?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

impl DaemonClient {
    /// The daemon of `data_dir`, if one is listening.
    pub async fn find(data_dir: &Path) -> Option<DaemonClient> {
        let socket = data_dir.join("ksi.sock");
        tokio::net::UnixStream::connect(&socket).await.ok()?;
        Some(DaemonClient { socket })
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<hyper::Response<Incoming>> {
        let mut sender = connect(&self.socket).await?;
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "ksi")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))?;
        Ok(sender.send_request(req).await?)
    }

    /// One JSON request; returns the status and the JSON body.
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

    /// GET returning the JSON body of a 2xx answer.
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let (status, body) = self.request("GET", path, None).await?;
        anyhow::ensure!((200..300).contains(&status), "GET {path}: {status} {body}");
        Ok(body)
    }

    /// Opens a Server-Sent Events stream.
    pub async fn stream(&self, path: &str) -> anyhow::Result<EventStream> {
        let resp = self.send("GET", path, None).await?;
        anyhow::ensure!(resp.status().is_success(), "GET {path}: {}", resp.status());
        Ok(EventStream {
            body: resp.into_body(),
            buf: Vec::new(),
        })
    }
}

/// The events of an SSE stream, one JSON value each.
pub struct EventStream {
    body: Incoming,
    buf: Vec<u8>,
}

impl EventStream {
    /// The next event's `data` as JSON; `None` when the daemon closed the stream.
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
