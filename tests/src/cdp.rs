//! A minimal Chrome DevTools Protocol client.
//!
//! One WebSocket to the browser endpoint (`ws://…/devtools/browser/…`), flat
//! sessions (the `sessionId` field selects the target a command goes to),
//! numeric request ids, and a reader task that routes responses to the waiting
//! caller and events to per-session subscribers.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Timeout used by [`CdpClient::call`].
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A CDP event (a message with `method` and no `id`).
#[derive(Debug, Clone)]
pub struct Event {
    /// e.g. `Runtime.consoleAPICalled`.
    pub method: String,
    /// The event's `params` (`null` when absent).
    pub params: Value,
    /// The flat session the event belongs to; `None` for browser-level events.
    pub session_id: Option<String>,
}

struct Pending {
    method: String,
    tx: oneshot::Sender<Result<Value>>,
}

#[derive(Default)]
struct State {
    /// Set (with the reason) once the reader task has stopped.
    closed: Option<String>,
    pending: HashMap<u64, Pending>,
    subscribers: HashMap<Option<String>, Vec<mpsc::UnboundedSender<Event>>>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    next_id: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State inconsistent in a
        // way that matters here, so ignore poisoning.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn dispatch(&self, text: &str) {
        let mut msg: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("CDP: unparsable message ({e}): {text:.200}");
                return;
            }
        };
        if let Some(id) = msg.get("id").and_then(Value::as_u64) {
            let Some(pending) = self.lock().pending.remove(&id) else {
                tracing::debug!("CDP: response to unknown/abandoned request {id}");
                return;
            };
            let result = match msg.get("error") {
                Some(err) => Err(cdp_error(&pending.method, err)),
                None => Ok(msg
                    .get_mut("result")
                    .map(Value::take)
                    .unwrap_or(Value::Null)),
            };
            let _ = pending.tx.send(result);
        } else if let Some(method) = msg.get("method").and_then(Value::as_str) {
            let event = Event {
                method: method.to_owned(),
                session_id: msg
                    .get("sessionId")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                params: msg
                    .get_mut("params")
                    .map(Value::take)
                    .unwrap_or(Value::Null),
            };
            let mut state = self.lock();
            if let Some(subs) = state.subscribers.get_mut(&event.session_id) {
                subs.retain(|s| s.send(event.clone()).is_ok());
            }
        } else {
            tracing::debug!("CDP: ignoring message {text:.200}");
        }
    }

    fn close(&self, reason: String) {
        tracing::debug!("CDP connection closed: {reason}");
        let mut state = self.lock();
        for (_, p) in state.pending.drain() {
            let _ = p.tx.send(Err(anyhow!(
                "CDP {}: connection closed ({reason})",
                p.method
            )));
        }
        // Dropping the senders ends the subscribers' streams.
        state.subscribers.clear();
        state.closed = Some(reason);
    }
}

fn cdp_error(method: &str, err: &Value) -> anyhow::Error {
    let message = err
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("unknown error");
    let code = err.get("code").map(Value::to_string).unwrap_or_default();
    match err.get("data") {
        Some(data) => anyhow!("CDP {method} failed: {message} (code {code}; data {data})"),
        None => anyhow!("CDP {method} failed: {message} (code {code})"),
    }
}

/// Removes a pending entry if the call future is dropped or times out.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

/// A connection to a browser's DevTools endpoint. Dropping it stops the reader
/// task and closes the socket.
pub struct CdpClient {
    url: String,
    shared: Arc<Shared>,
    sink: tokio::sync::Mutex<SplitSink<Ws, Message>>,
    reader: JoinHandle<()>,
}

impl fmt::Debug for CdpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CdpClient")
            .field("url", &self.url)
            .field("closed", &self.shared.lock().closed)
            .finish_non_exhaustive()
    }
}

impl CdpClient {
    /// Connects to a DevTools WebSocket URL (as printed by
    /// `DevTools listening on ws://…`).
    pub async fn connect(url: &str) -> Result<CdpClient> {
        let (ws, _response) = tokio_tungstenite::connect_async(url)
            .await
            .with_context(|| format!("connecting to DevTools at {url}"))?;
        let (sink, stream) = ws.split();
        let shared = Arc::new(Shared::default());
        let reader = tokio::spawn(read_loop(shared.clone(), stream));
        Ok(CdpClient {
            url: url.to_owned(),
            shared,
            sink: tokio::sync::Mutex::new(sink),
            reader,
        })
    }

    /// The WebSocket URL this client is connected to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether the connection has gone away (all further calls fail).
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed.is_some()
    }

    /// Sends `method` with `params` to the browser (`session == None`) or to a
    /// flat session, and waits up to [`DEFAULT_CALL_TIMEOUT`] for the result.
    pub async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Result<Value> {
        self.call_with_timeout(session, method, params, DEFAULT_CALL_TIMEOUT)
            .await
    }

    /// Like [`call`](Self::call) with an explicit timeout. A CDP error
    /// response becomes an `Err` naming the method.
    pub async fn call_with_timeout(
        &self,
        session: Option<&str>,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<Value> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        {
            let mut state = self.shared.lock();
            if let Some(reason) = &state.closed {
                bail!("CDP {method}: connection closed ({reason})");
            }
            state.pending.insert(
                id,
                Pending {
                    method: method.to_owned(),
                    tx,
                },
            );
        }
        let _guard = PendingGuard {
            shared: &self.shared,
            id,
        };

        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            msg["sessionId"] = Value::String(session.to_owned());
        }
        self.sink
            .lock()
            .await
            .send(Message::Text(msg.to_string().into()))
            .await
            .with_context(|| format!("CDP {method}: sending request"))?;

        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => bail!("CDP {method}: connection closed before the response"),
            Err(_) => bail!("CDP {method}: no response within {timeout:?}"),
        }
    }

    /// Subscribes to the events of one flat session (`None`: browser-level
    /// events). The stream ends when the connection closes.
    pub fn subscribe(&self, session: Option<&str>) -> mpsc::UnboundedReceiver<Event> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = self.shared.lock();
        if state.closed.is_none() {
            state
                .subscribers
                .entry(session.map(str::to_owned))
                .or_default()
                .push(tx);
        }
        rx
    }
}

impl Drop for CdpClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn read_loop(shared: Arc<Shared>, mut stream: SplitStream<Ws>) {
    let reason = loop {
        match stream.next().await {
            None => break "stream ended".to_owned(),
            Some(Err(e)) => break format!("read error: {e}"),
            Some(Ok(Message::Text(text))) => shared.dispatch(text.as_str()),
            Some(Ok(Message::Binary(bytes))) => match std::str::from_utf8(&bytes) {
                Ok(text) => shared.dispatch(text),
                Err(_) => tracing::warn!("CDP: non-UTF-8 binary message ignored"),
            },
            Some(Ok(Message::Close(frame))) => break format!("closed by browser: {frame:?}"),
            Some(Ok(_)) => {}
        }
    };
    shared.close(reason);
}
