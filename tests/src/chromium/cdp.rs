//! The DevTools protocol over one WebSocket: commands with ids and their answers, events routed
//! to the page (flat session) they belong to, and what a test does with a page: navigate and
//! wait for the load, evaluate, read cookies.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{STEP, log_text};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A tab, attached.
#[derive(Debug)]
pub struct Page {
    conn: Arc<Conn>,
    session: String,
    events: mpsc::UnboundedReceiver<Value>,
    /// The events received since the last [`Page::forget`], oldest first.
    seen: Vec<Value>,
}

/// A document the page loaded, as the browser's network events describe it.
#[derive(Debug, Clone)]
pub struct Load {
    /// The URL of the document (after redirects).
    pub url: String,
    /// Its HTTP status.
    pub status: u16,
    /// The redirects on the way, in order.
    pub redirects: Vec<Redirect>,
}

/// A redirect the browser followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// The redirect's status (301, 302, 303, 307, 308).
    pub status: u16,
    /// The URL that answered with the redirect.
    pub from: String,
    /// The URL it sent the browser to.
    pub to: String,
}

impl Page {
    /// The page of `session` (from `Target.attachToTarget`), with the `Page` and `Network`
    /// domains and lifecycle events enabled.
    pub(super) async fn attach(conn: Arc<Conn>, session: &str) -> Page {
        let (tx, events) = mpsc::unbounded_channel();
        conn.sessions
            .lock()
            .expect("lock")
            .insert(session.to_owned(), tx);
        let page = Page {
            conn,
            session: session.to_owned(),
            events,
            seen: Vec::new(),
        };
        page.call("Page.enable", json!({})).await;
        page.call("Network.enable", json!({})).await;
        page.call("Page.setLifecycleEventsEnabled", json!({ "enabled": true }))
            .await;
        page
    }

    /// Sends a command to this page and returns its result; panics on a protocol error.
    pub async fn call(&self, method: &str, params: Value) -> Value {
        self.conn.call(Some(&self.session), method, params).await
    }

    /// Navigates to `url` and waits for the load of the document it ends at (redirects
    /// followed). An HTTP error status is a load like any other; a network error panics.
    pub async fn navigate(&mut self, url: &str) -> Load {
        self.forget();
        let nav = self.call("Page.navigate", json!({ "url": url })).await;
        if let Some(error) = nav.get("errorText").and_then(Value::as_str) {
            panic!("navigating to {url}: {error}");
        }
        let loader = str_at(&nav, "/loaderId").to_owned();
        self.load(&loader).await
    }

    /// Runs `action` (a script that makes the page navigate, such as a click on a link) and
    /// waits for the load of the document the main frame navigates to.
    pub async fn navigating(&mut self, action: &str) -> Load {
        self.forget();
        self.eval(action).await;
        let navigated = self
            .wait_for("the main frame to navigate", |e| {
                e["method"] == "Page.frameNavigated"
                    && e["params"]["frame"].get("parentId").is_none()
            })
            .await;
        let loader = str_at(&navigated, "/params/frame/loaderId").to_owned();
        self.load(&loader).await
    }

    /// Evaluates `expression` in the page, awaiting it if it is a promise, and returns its
    /// value as JSON; panics if it throws (or rejects).
    pub async fn eval(&self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "awaitPromise": true, "returnByValue": true }),
            )
            .await;
        if let Some(thrown) = result.get("exceptionDetails") {
            let what = thrown["exception"]["description"]
                .as_str()
                .or_else(|| thrown["text"].as_str())
                .unwrap_or("an exception");
            panic!("`{expression}` threw: {what}");
        }
        result["result"]["value"].clone()
    }

    /// [`Page::eval`] for an expression whose value is a string.
    pub async fn eval_str(&self, expression: &str) -> String {
        match self.eval(expression).await {
            Value::String(s) => s,
            other => panic!("`{expression}` is not a string: {other}"),
        }
    }

    /// The cookies the browser would send to `url`, as `Network.Cookie` objects (`name`,
    /// `value`, `domain`, `httpOnly`, `sameSite`, `secure`, ...).
    pub async fn cookies(&self, url: &str) -> Vec<Value> {
        let result = self
            .call("Network.getCookies", json!({ "urls": [url] }))
            .await;
        result["cookies"].as_array().cloned().unwrap_or_default()
    }

    /// Forgets the events received so far, so that waits only see what happens next.
    fn forget(&mut self) {
        while self.events.try_recv().is_ok() {}
        self.seen.clear();
    }

    /// Waits for the `load` lifecycle event of the document of `loader` (a navigation's
    /// loader id), then reads its response and redirects from the network events.
    async fn load(&mut self, loader: &str) -> Load {
        let of_loader = |e: &Value| e["params"]["loaderId"] == loader;
        self.wait_for(&format!("the load of document {loader}"), |e| {
            e["method"] == "Page.lifecycleEvent" && e["params"]["name"] == "load" && of_loader(e)
        })
        .await;
        let is_response = |e: &Value| {
            e["method"] == "Network.responseReceived"
                && e["params"]["type"] == "Document"
                && of_loader(e)
        };
        let response = match self.seen.iter().find(|e| is_response(e)) {
            Some(e) => e.clone(),
            None => {
                self.wait_for(&format!("the response of document {loader}"), is_response)
                    .await
            }
        };
        let redirects = self
            .seen
            .iter()
            .filter(|e| {
                e["method"] == "Network.requestWillBeSent"
                    && of_loader(e)
                    && e["params"].get("redirectResponse").is_some()
            })
            .map(|e| Redirect {
                status: status_at(e, "/params/redirectResponse/status"),
                from: str_at(e, "/params/redirectResponse/url").to_owned(),
                to: str_at(e, "/params/request/url").to_owned(),
            })
            .collect();
        Load {
            url: str_at(&response, "/params/response/url").to_owned(),
            status: status_at(&response, "/params/response/status"),
            redirects,
        }
    }

    /// Waits up to [`STEP`] for an event that `matches` (and returns it), keeping every event
    /// received on the way in `seen`.
    async fn wait_for(&mut self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + STEP;
        loop {
            match timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => {
                    self.seen.push(event.clone());
                    if matches(&event) {
                        return event;
                    }
                }
                Ok(None) => panic!(
                    "waiting for {what}: the browser connection closed; Chromium's stderr:\n{}",
                    log_text(&self.conn.log)
                ),
                Err(_) => {
                    let methods: Vec<&str> = self
                        .seen
                        .iter()
                        .filter_map(|e| e["method"].as_str())
                        .collect();
                    panic!("no {what} within {STEP:?}; events seen: {methods:?}");
                }
            }
        }
    }
}

/// The DevTools connection: commands go out with an id, their answers come back by id, and
/// events are routed to the page of their session.
#[derive(Debug)]
pub(super) struct Conn {
    sink: tokio::sync::Mutex<SplitSink<Ws, Message>>,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Value>>>,
    sessions: Mutex<HashMap<String, mpsc::UnboundedSender<Value>>>,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl Conn {
    /// Connects to the browser's DevTools endpoint `url`; the task it returns reads the
    /// connection. `log` is Chromium's stderr, for failure messages.
    pub(super) async fn connect(
        url: &str,
        log: Arc<Mutex<VecDeque<String>>>,
    ) -> (Arc<Conn>, JoinHandle<()>) {
        let ws = match timeout(STEP, tokio_tungstenite::connect_async(url)).await {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(e)) => panic!("connecting to {url}: {e}"),
            Err(_) => panic!("connecting to {url} took over {STEP:?}"),
        };
        let (sink, stream) = ws.split();
        let conn = Arc::new(Conn {
            sink: tokio::sync::Mutex::new(sink),
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            log,
        });
        let reader = tokio::spawn(read(stream, conn.clone()));
        (conn, reader)
    }

    /// Sends a command (to the browser, or to a page's `session`) and waits up to [`STEP`] for
    /// its result; panics on a protocol error.
    pub(super) async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("lock").insert(id, tx);
        let mut command = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            command["sessionId"] = json!(session);
        }
        let sent = self
            .sink
            .lock()
            .await
            .send(Message::text(command.to_string()))
            .await;
        if let Err(e) = sent {
            panic!("{method}: the browser connection failed: {e}");
        }
        let mut answer = match timeout(STEP, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => panic!(
                "{method}: the browser connection closed; Chromium's stderr:\n{}",
                log_text(&self.log)
            ),
            Err(_) => panic!("{method}: no answer within {STEP:?}"),
        };
        if let Some(error) = answer.get("error") {
            panic!("{method} failed: {error}");
        }
        answer["result"].take()
    }
}

/// Routes what the browser sends until the connection closes; then pending commands and
/// event waits fail at once instead of timing out.
async fn read(mut stream: SplitStream<Ws>, conn: Arc<Conn>) {
    while let Some(Ok(message)) = stream.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let Ok(message) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if let Some(id) = message["id"].as_u64() {
            if let Some(tx) = conn.pending.lock().expect("lock").remove(&id) {
                let _ = tx.send(message);
            }
        } else if let Some(session) = message["sessionId"].as_str() {
            if let Some(tx) = conn.sessions.lock().expect("lock").get(session) {
                let _ = tx.send(message);
            }
        }
    }
    conn.pending.lock().expect("lock").clear();
    conn.sessions.lock().expect("lock").clear();
}

/// The string at `pointer` in a protocol message; panics naming it if absent.
pub(super) fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {value}"))
}

/// The HTTP status at `pointer` (CDP sends statuses as numbers).
fn status_at(value: &Value, pointer: &str) -> u16 {
    value
        .pointer(pointer)
        .and_then(Value::as_u64)
        .and_then(|s| u16::try_from(s).ok())
        .unwrap_or_else(|| panic!("no HTTP status at {pointer} in {value}"))
}
