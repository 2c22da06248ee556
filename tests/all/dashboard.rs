//! The web dashboard in a real headless browser (Debian's `chromium`), driven over the Chrome
//! DevTools Protocol: the page follows a workflow live, without a reload, and leaves a
//! screenshot in `target/test-output/dashboard.png`.
//!
//! Without chromium the test fails when `CI=true` (`.ci/run` installs it) and is skipped with a
//! loud message otherwise. `KSI_CHROMIUM=/path/to/chrome` picks another Chromium-based browser.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::support::Daemon;

/// The browser to drive: `KSI_CHROMIUM`, else the first of the usual names on `PATH`.
fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KSI_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|p| p.is_file())
}

/// A headless chromium in its own process group, killed (with its renderers) on drop.
struct Chromium {
    child: Child,
    _profile: tempfile::TempDir,
    /// `ws://127.0.0.1:PORT/devtools/browser/UUID`
    ws_url: String,
}

impl Chromium {
    async fn launch(exe: &Path) -> anyhow::Result<Chromium> {
        use std::os::unix::process::CommandExt;
        let profile = tempfile::tempdir()?;
        let child = Command::new(exe)
            .args([
                "--headless",
                // CI runs as root, where chromium refuses to start sandboxed.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--remote-debugging-port=0",
                "--window-size=1400,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("could not start {}", exe.display()))?;
        let mut browser = Chromium {
            child,
            ws_url: String::new(),
            _profile: profile,
        };
        // With port 0, chromium writes the port it chose and the browser's path to this file.
        let port_file = browser._profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&port_file)
                && let [port, path] = text.lines().collect::<Vec<_>>()[..]
            {
                browser.ws_url = format!("ws://127.0.0.1:{port}{path}");
                return Ok(browser);
            }
            if let Some(status) = browser.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before opening its DevTools port",
                    exe.display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not open its DevTools port within 30 s",
                    exe.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group we created for this child; no memory involved.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// One page of the browser, over a flattened DevTools session.
struct Page {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    session: String,
    next_id: u64,
    /// Uncaught exceptions and console errors the page reported.
    errors: Vec<String>,
}

impl Page {
    /// Opens a new tab and enables the domains the test reads.
    async fn open(browser: &Chromium) -> anyhow::Result<Page> {
        let (ws, _) = tokio_tungstenite::connect_async(browser.ws_url.as_str())
            .await
            .with_context(|| format!("connect to {}", browser.ws_url))?;
        let mut page = Page {
            ws,
            session: String::new(),
            next_id: 0,
            errors: Vec::new(),
        };
        let target = page
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await?;
        let attached = page
            .call(
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await?;
        page.session = attached["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("no sessionId in {attached}"))?
            .to_string();
        page.call("Runtime.enable", json!({})).await?;
        page.call("Page.enable", json!({})).await?;
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await?;
        Ok(page)
    }

    /// Sends one command (to the page's session once attached) and waits for its answer,
    /// keeping the page's errors from the events that arrive meanwhile.
    async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        self.ws.send(Message::Text(msg.to_string().into())).await?;
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .with_context(|| format!("no answer to {method} within 30 s"))?
                .ok_or_else(|| anyhow!("the browser closed the DevTools connection"))??;
            let Message::Text(text) = frame else { continue };
            let v: Value = serde_json::from_str(&text)?;
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    bail!("{method} failed: {e}");
                }
                return Ok(v["result"].clone());
            }
            match v["method"].as_str() {
                Some("Runtime.exceptionThrown") => self.errors.push(format!(
                    "uncaught: {}",
                    v["params"]["exceptionDetails"]["exception"]["description"]
                )),
                Some("Runtime.consoleAPICalled") if v["params"]["type"] == "error" => {
                    let args: Vec<String> = v["params"]["args"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| {
                            a["value"]
                                .as_str()
                                .map_or(a["description"].to_string(), str::to_string)
                        })
                        .collect();
                    self.errors
                        .push(format!("console.error: {}", args.join(" ")));
                }
                _ => {}
            }
        }
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    async fn eval(&mut self, expr: &str) -> anyhow::Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("evaluating {expr} threw: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Evaluates `state` until `done` accepts its value; fails with the last value seen.
    async fn wait_for(
        &mut self,
        what: &str,
        state: &str,
        done: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.eval(state).await?;
            if done(&v) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("the dashboard did not show {what} within 60 s; it shows {v:#}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A PNG of the whole page, written to `path`.
    async fn screenshot(&mut self, path: &Path) -> anyhow::Result<()> {
        use base64::Engine as _;
        let r = self
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap_or_default())
            .context("decode the screenshot")?;
        std::fs::create_dir_all(path.parent().unwrap())?;
        std::fs::write(path, png).with_context(|| format!("write {}", path.display()))
    }
}

/// What the test reads from the page: the text of the parts it checks, cell by cell.
const PAGE_STATE: &str = r##"(() => {
  const cells = sel => [...document.querySelectorAll(sel + " tbody tr")].map(tr => ({
    id: tr.dataset.id || null, cells: [...tr.cells].map(c => c.textContent) }));
  const text = id => document.getElementById(id).textContent;
  return { conn: text("conn"), workflows: cells("#workflows"), steps: cells("#steps"),
           title: text("detail-title"), transcript: text("transcript"), feed: text("feed"),
           plugins: cells("#plugins"), total_workflows: text("s-wf"), total_calls: text("s-calls"),
           marker: window.__ksiTestMarker ?? null };
})()"##;

/// The rows of a table as lists of cell texts.
fn table(state: &Value, name: &str) -> Vec<Vec<String>> {
    state[name]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            r["cells"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| c.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn the_dashboard_shows_a_debate_completing_live_in_a_real_browser() -> anyhow::Result<()> {
    let Some(exe) = find_chromium() else {
        let msg = "chromium not found (looked for KSI_CHROMIUM, then chromium, chromium-browser, google-chrome on PATH); install it with `apt-get install chromium`";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            bail!("{msg} (.ci/run does this on a CI machine)");
        }
        eprintln!("\n!!! SKIPPED the dashboard browser test: {msg}\n");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let d = Daemon::start(dir.path(), &[]).await;
    let browser = Chromium::launch(&exe).await?;
    let mut page = Page::open(&browser).await?;
    let url = format!("http://127.0.0.1:{}/", d.port);
    page.call("Page.navigate", json!({ "url": url })).await?;
    // Page.navigate answers when the navigation starts, not when the document is there.
    let loaded = format!("location.href === {url:?} && document.readyState === 'complete'");
    page.wait_for("the page loaded", &loaded, |v| v == true)
        .await?;

    // Loaded, the live stream connected, the bundled plugins listed, no workflow yet.
    let before = page
        .wait_for("the live stream connected", PAGE_STATE, |s| {
            s["conn"].as_str().is_some_and(|c| c.contains("live"))
                && table(s, "plugins").iter().any(|r| r[0] == "debate")
                && !table(s, "workflows").is_empty()
        })
        .await?;
    let first_rows = table(&before, "workflows");
    assert!(
        first_rows.len() == 1 && first_rows[0][0].starts_with("no workflows yet"),
        "{before:#}"
    );
    // A reload would drop this marker: it proves the page below updated itself.
    page.eval("window.__ksiTestMarker = 'loaded-once'").await?;

    let (s, b) = d
        .post(
            "/workflows",
            &json!({"type": "debate", "params": {"topic": "Browsers are the best test harness"}}),
        )
        .await
        .map_err(|e| anyhow!(e))?;
    assert_eq!(s, 201, "{b}");
    let id = b["id"].as_str().unwrap().to_string();

    let steps = ["opening", "rebuttal", "closing", "judge"];
    let after = page
        .wait_for(
            &format!("workflow {id} completed with its 4 steps"),
            PAGE_STATE,
            |s| {
                let wf_done = s["workflows"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|r| r["id"] == id.as_str() && r["cells"][2] == "completed");
                let step_rows = table(s, "steps");
                wf_done
                    && step_rows.len() == steps.len()
                    && step_rows
                        .iter()
                        .zip(steps)
                        .all(|(r, name)| r[1] == name && r[3] == "completed")
                    && s["title"].as_str().is_some_and(|t| t.contains("completed"))
            },
        )
        .await?;

    // The same page, updated over the stream: the feed holds the workflow's live events.
    assert_eq!(after["marker"], "loaded-once", "the page was reloaded");
    let feed = after["feed"].as_str().unwrap();
    assert!(
        feed.contains("workflow.started") && feed.contains("workflow.complete"),
        "{feed}"
    );
    assert!(feed.contains(&id), "the live feed names {id}: {feed}");
    assert!(after["title"].as_str().unwrap().contains(&id), "{after:#}");
    // The transcript shows the agents' turns, read through their file references.
    let transcript = after["transcript"].as_str().unwrap();
    assert!(transcript.contains("[simulated]"), "{transcript}");
    assert!(transcript.contains("claude_logs/"), "{transcript}");
    // Totals agree with the API.
    let (_, wf) = d
        .get(&format!("/workflows/{id}"))
        .await
        .map_err(|e| anyhow!(e))?;
    assert_eq!(after["total_workflows"], "1");
    assert_eq!(
        after["total_calls"].as_str().unwrap(),
        wf["claude_calls"].to_string(),
        "{after:#}"
    );

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-output/dashboard.png");
    page.screenshot(&shot).await?;
    let png = std::fs::read(&shot)?;
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    println!("dashboard screenshot: {}", shot.display());

    assert!(
        page.errors.is_empty(),
        "the page reported errors: {:#?}",
        page.errors
    );
    Ok(())
}
