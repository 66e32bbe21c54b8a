//! Headless Chromium driven over the DevTools protocol.
//!
//! [`Chromium::launch`] starts a throw-away browser (own process group, own
//! temporary profile); [`Chromium::open`] gives a [`Page`] (one tab, one flat
//! CDP session) to evaluate JavaScript in.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::cdp::{CdpClient, Event};

/// How long [`Chromium::launch`] waits for the DevTools endpoint.
pub const LAUNCH_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`Chromium::open`] waits for the page load.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`Page::eval`] waits for the result (including awaited promises).
pub const EVAL_TIMEOUT: Duration = Duration::from_secs(60);
/// Poll interval of [`Page::wait_for`] and of the load wait.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Flags every browser is started with (before `--user-data-dir` and the
/// extra arguments of [`Chromium::launch_with`]).
pub const FLAGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--autoplay-policy=no-user-gesture-required",
    "--remote-debugging-port=0",
];

/// The browser binary: `$RIDGE_CHROMIUM` if set and non-empty, else
/// `/usr/bin/chromium` (the Debian package, installed by `tests/install-deps.sh --test`).
pub fn chromium_binary() -> PathBuf {
    match std::env::var_os("RIDGE_CHROMIUM") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from("/usr/bin/chromium"),
    }
}

/// A temporary directory removed on drop.
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> Result<TempDir> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}-{nanos:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Chromium's helpers may still be writing for a moment after the kill.
        for _ in 0..5 {
            match std::fs::remove_dir_all(&self.0) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => return,
            }
        }
        tracing::warn!("could not remove {}", self.0.display());
    }
}

/// The browser process, leader of its own process group. Drop kills the whole
/// group (browser, zygote, renderers, GPU/utility processes) and reaps it.
#[derive(Debug)]
struct BrowserProcess {
    child: Child,
    pid: Option<u32>,
}

impl Drop for BrowserProcess {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            // No libc in this crate: use kill(1) to signal the process group.
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.start_kill();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                _ => return,
            }
        }
        tracing::warn!("chromium (pid {:?}) did not exit after SIGKILL", self.pid);
    }
}

/// A headless Chromium. Owns the child process and a temporary
/// `--user-data-dir`; dropping it kills the browser and removes the directory.
pub struct Chromium {
    // Field order is drop order: connection, then process, then profile dir.
    cdp: Arc<CdpClient>,
    stderr_task: JoinHandle<()>,
    process: BrowserProcess,
    user_data_dir: TempDir,
    ws_url: String,
}

impl fmt::Debug for Chromium {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chromium")
            .field("pid", &self.process.pid)
            .field("ws_url", &self.ws_url)
            .field("user_data_dir", &self.user_data_dir.0)
            .finish_non_exhaustive()
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        self.stderr_task.abort();
    }
}

impl Chromium {
    /// Launches the browser with [`FLAGS`], `--user-data-dir=<tmp>` and
    /// `about:blank`, waits (up to [`LAUNCH_TIMEOUT`]) for
    /// `DevTools listening on ws://…` on stderr and connects to it. The rest
    /// of stderr is logged at debug level (target `chromium`).
    pub async fn launch() -> Result<Chromium> {
        Self::launch_with(&[]).await
    }

    /// Like [`launch`](Self::launch), with extra command-line arguments
    /// (placed after the standard flags, before the `about:blank` URL).
    pub async fn launch_with(extra_args: &[&str]) -> Result<Chromium> {
        let binary = chromium_binary();
        let user_data_dir = TempDir::new("ridge-chromium")?;
        let mut cmd = Command::new(&binary);
        cmd.args(FLAGS)
            .arg(format!("--user-data-dir={}", user_data_dir.0.display()))
            .args(extra_args)
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", binary.display()))?;
        let stderr = child.stderr.take();
        let pid = child.id();
        let mut process = BrowserProcess { child, pid };
        let stderr = stderr.context("chromium stderr not captured")?;

        let mut lines = BufReader::new(stderr).lines();
        let mut collected = Vec::new();
        let found = tokio::time::timeout(LAUNCH_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                tracing::debug!(target: "chromium", "{line}");
                if let Some(pos) = line.find("DevTools listening on ") {
                    let url = line[pos + "DevTools listening on ".len()..]
                        .trim()
                        .to_owned();
                    return Ok::<_, std::io::Error>(Some(url));
                }
                collected.push(line);
            }
            Ok(None)
        })
        .await;
        let ws_url = match found {
            Ok(Ok(Some(url))) => url,
            other => {
                let why = match other {
                    Err(_) => format!("no DevTools endpoint after {LAUNCH_TIMEOUT:?}"),
                    Ok(Err(e)) => format!("reading stderr failed: {e}"),
                    Ok(Ok(_)) => {
                        let status = process.child.wait().await.ok();
                        format!("exited before the DevTools endpoint appeared ({status:?})")
                    }
                };
                bail!(
                    "launching {}: {why}; stderr:\n{}",
                    binary.display(),
                    collected.join("\n")
                );
            }
        };
        tracing::debug!(
            "chromium pid {pid:?} listening on {ws_url} after {:?}",
            started.elapsed()
        );

        let stderr_task = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::debug!(target: "chromium", "{line}");
            }
        });
        let cdp = match CdpClient::connect(&ws_url).await {
            Ok(cdp) => Arc::new(cdp),
            Err(e) => {
                stderr_task.abort();
                return Err(e);
            }
        };
        Ok(Chromium {
            cdp,
            stderr_task,
            process,
            user_data_dir,
            ws_url,
        })
    }

    /// The browser-level DevTools WebSocket URL.
    pub fn ws_url(&self) -> &str {
        &self.ws_url
    }

    /// The browser's process id (also its process group id).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid
    }

    /// The temporary profile directory.
    pub fn user_data_dir(&self) -> &Path {
        &self.user_data_dir.0
    }

    /// The browser-level CDP connection, for commands this module lacks.
    pub fn cdp(&self) -> &Arc<CdpClient> {
        &self.cdp
    }

    /// Opens a new tab and navigates it to `url`: `Target.createTarget`
    /// (at `about:blank`) and `Target.attachToTarget {flatten: true}` on the
    /// browser session, `Runtime.enable` + `Page.enable`, `Page.navigate`,
    /// then waits up to [`LOAD_TIMEOUT`] for `Page.loadEventFired` or
    /// `document.readyState == "complete"`.
    pub async fn open(&self, url: &str) -> Result<Page> {
        let created = self
            .cdp
            .call(None, "Target.createTarget", json!({ "url": "about:blank" }))
            .await?;
        let target_id = created["targetId"]
            .as_str()
            .context("Target.createTarget: no targetId")?
            .to_owned();
        let attached = self
            .cdp
            .call(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await?;
        let session_id = attached["sessionId"]
            .as_str()
            .context("Target.attachToTarget: no sessionId")?
            .to_owned();

        let events = self.cdp.subscribe(Some(&session_id));
        let console = Arc::new(Mutex::new(Vec::new()));
        let (loads_tx, mut loads) = watch::channel(0u64);
        let events_task = tokio::spawn(collect_events(events, console.clone(), loads_tx));
        let page = Page {
            cdp: self.cdp.clone(),
            target_id,
            session_id,
            console,
            events_task,
        };
        match page.navigate(url, &mut loads).await {
            Ok(()) => Ok(page),
            Err(e) => {
                let console = page.console();
                let _ = page.close().await;
                if console.is_empty() {
                    Err(e)
                } else {
                    Err(e.context(format!("page console: {console:#?}")))
                }
            }
        }
    }
}

async fn collect_events(
    mut events: mpsc::UnboundedReceiver<Event>,
    console: Arc<Mutex<Vec<String>>>,
    loads: watch::Sender<u64>,
) {
    while let Some(event) = events.recv().await {
        let entry = match event.method.as_str() {
            "Page.loadEventFired" => {
                loads.send_modify(|n| *n += 1);
                continue;
            }
            "Runtime.consoleAPICalled" => {
                let kind = event.params["type"].as_str().unwrap_or("log");
                let args: Vec<String> = event.params["args"]
                    .as_array()
                    .map(|a| a.iter().map(remote_object_text).collect())
                    .unwrap_or_default();
                format!("console.{kind}: {}", args.join(" "))
            }
            "Runtime.exceptionThrown" => format!(
                "uncaught exception: {}",
                exception_text(&event.params["exceptionDetails"])
            ),
            _ => continue,
        };
        tracing::debug!(target: "chromium::console", "{entry}");
        console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(entry);
    }
}

/// A short human-readable rendering of a CDP `Runtime.RemoteObject`.
fn remote_object_text(obj: &Value) -> String {
    if let Some(v) = obj.get("value") {
        return match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
    }
    for key in ["unserializableValue", "description", "type"] {
        if let Some(s) = obj.get(key).and_then(Value::as_str) {
            return s.to_owned();
        }
    }
    obj.to_string()
}

/// `text` plus the exception's description (stack) of `Runtime.ExceptionDetails`.
fn exception_text(details: &Value) -> String {
    let text = details["text"].as_str().unwrap_or("exception");
    match details.get("exception") {
        Some(ex) => format!("{text} {}", remote_object_text(ex)),
        None => {
            let line = details["lineNumber"].as_i64().unwrap_or(-1);
            let col = details["columnNumber"].as_i64().unwrap_or(-1);
            format!("{text} (at {line}:{col})")
        }
    }
}

fn abbreviate(s: &str) -> String {
    const MAX: usize = 120;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// One tab, attached through a flat CDP session with the Runtime domain
/// enabled.
pub struct Page {
    cdp: Arc<CdpClient>,
    target_id: String,
    session_id: String,
    console: Arc<Mutex<Vec<String>>>,
    events_task: JoinHandle<()>,
}

impl fmt::Debug for Page {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Page")
            .field("target_id", &self.target_id)
            .field("session_id", &self.session_id)
            .finish_non_exhaustive()
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        self.events_task.abort();
    }
}

impl Page {
    async fn navigate(&self, url: &str, loads: &mut watch::Receiver<u64>) -> Result<()> {
        self.call("Runtime.enable", json!({})).await?;
        self.call("Page.enable", json!({})).await?;
        let nav = self.call("Page.navigate", json!({ "url": url })).await?;
        if let Some(err) = nav["errorText"].as_str().filter(|e| !e.is_empty()) {
            bail!("navigating to {}: {err}", abbreviate(url));
        }
        // Page.navigate answers once the new document has committed, so load
        // events from here on (and readyState) belong to it.
        loads.mark_unchanged();
        let deadline = tokio::time::Instant::now() + LOAD_TIMEOUT;
        let mut last: String;
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self
                .eval_with_timeout("document.readyState", remaining.max(POLL_INTERVAL))
                .await
            {
                Ok(Value::String(s)) if s == "complete" => return Ok(()),
                Ok(v) => last = v.to_string(),
                Err(e) => last = format!("{e:#}"),
            }
            tokio::select! {
                Ok(()) = loads.changed() => return Ok(()),
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
                _ = tokio::time::sleep_until(deadline) => bail!(
                    "page {} did not load within {LOAD_TIMEOUT:?} (readyState: {last})",
                    abbreviate(url)
                ),
            }
        }
    }

    /// The DevTools target id of this tab.
    pub fn target_id(&self) -> &str {
        &self.target_id
    }

    /// The flat CDP session id of this tab.
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// Sends a CDP command in this page's session (for what this API lacks).
    pub async fn call(&self, method: &str, params: Value) -> Result<Value> {
        self.cdp.call(Some(&self.session_id), method, params).await
    }

    /// `Runtime.evaluate {expression, awaitPromise: true, returnByValue: true}`.
    /// Returns the value (`null` for `undefined` and non-serializable objects;
    /// `NaN`, `Infinity`, `-0`, bigints as strings). A thrown exception or a
    /// rejected promise becomes an `Err` with the exception text and
    /// description. Times out after [`EVAL_TIMEOUT`].
    pub async fn eval(&self, expression: &str) -> Result<Value> {
        self.eval_with_timeout(expression, EVAL_TIMEOUT).await
    }

    async fn eval_with_timeout(&self, expression: &str, timeout: Duration) -> Result<Value> {
        let mut reply = self
            .cdp
            .call_with_timeout(
                Some(&self.session_id),
                "Runtime.evaluate",
                json!({
                    "expression": expression,
                    "awaitPromise": true,
                    "returnByValue": true,
                    "userGesture": true,
                }),
                timeout,
            )
            .await
            .with_context(|| format!("evaluating `{}`", abbreviate(expression)))?;
        if let Some(details) = reply.get("exceptionDetails") {
            return Err(anyhow!(
                "JavaScript exception evaluating `{}`: {}",
                abbreviate(expression),
                exception_text(details)
            ));
        }
        let result = reply["result"].take();
        Ok(match result.get("value") {
            Some(v) => v.clone(),
            None => result
                .get("unserializableValue")
                .cloned()
                .unwrap_or(Value::Null),
        })
    }

    /// Evaluates `expression` (promises are awaited) every
    /// [`POLL_INTERVAL`] until it yields JS `true`; `Err` with the last value
    /// or error after `timeout`.
    pub async fn wait_for(&self, expression: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("<not evaluated>");
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if !remaining.is_zero() {
                match self
                    .eval_with_timeout(expression, remaining.min(EVAL_TIMEOUT))
                    .await
                {
                    Ok(Value::Bool(true)) => return Ok(()),
                    Ok(v) => last = v.to_string(),
                    Err(e) => {
                        if self.cdp.is_closed() {
                            return Err(e.context("browser connection lost"));
                        }
                        last = format!("error: {e:#}");
                    }
                }
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                bail!(
                    "timed out after {timeout:?} waiting for `{}`; last value: {last}",
                    abbreviate(expression)
                );
            }
            tokio::time::sleep(POLL_INTERVAL.min(remaining)).await;
        }
    }

    /// Console messages (`console.<type>: args…`) and uncaught exceptions
    /// (`uncaught exception: …`) seen so far on this page, oldest first.
    pub fn console(&self) -> Vec<String> {
        self.console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Closes the tab (`Target.closeTarget`).
    pub async fn close(self) -> Result<()> {
        self.cdp
            .call(
                None,
                "Target.closeTarget",
                json!({ "targetId": self.target_id }),
            )
            .await?;
        Ok(())
    }
}
