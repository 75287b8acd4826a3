//! A local stand-in for an OpenAI-compatible chat-completions API: an axum server on
//! a loopback port that answers `POST /v1/chat/completions` with server-sent events,
//! the way the real API streams. The only mock in these tests: a remote LLM API
//! cannot be run here. Each test scripts what the next request gets.

#![allow(
    dead_code,
    reason = "each test binary uses its own part of the shared helpers"
)]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::Notify;

/// What the fixture answers to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scenario {
    /// Streams these deltas, a final chunk with `finish_reason`, then `[DONE]`.
    Reply(Vec<String>),
    /// Streams the last user message back in two deltas.
    Echo,
    /// The same as `Reply`, but the body arrives one byte at a time with CRLF line ends.
    ByteByByte(Vec<String>),
    /// Answers this status with an OpenAI-style error body.
    Status(u16, String),
    /// Streams one delta, then an `error` event.
    InlineError,
    /// Streams one delta, waits for [`Fixture::release`] (so the client surely has the
    /// delta), then breaks the connection mid-body.
    Broken,
    /// Streams one delta, then ends the body cleanly without `[DONE]`.
    Truncated,
    /// Streams one delta, then sends nothing more while the connection stays open.
    Stall,
    /// Streams one delta, then waits for [`Fixture::release`] before the rest.
    Gated(Vec<String>),
}

/// One request the fixture received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub authorization: Option<String>,
    pub body: Value,
}

struct Shared {
    script: Mutex<Vec<Scenario>>,
    default: Mutex<Scenario>,
    requests: Mutex<Vec<Recorded>>,
    gate: Notify,
}

/// A running fixture server.
pub struct Fixture {
    /// `http://127.0.0.1:PORT/v1`, what `CHATGATE_LLM_BASE_URL` would hold.
    pub base_url: String,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Fixture {
    /// Starts the server; requests get `default` unless scripted otherwise.
    pub async fn start(default: Scenario) -> Fixture {
        let shared = Arc::new(Shared {
            script: Mutex::new(Vec::new()),
            default: Mutex::new(default),
            requests: Mutex::new(Vec::new()),
            gate: Notify::new(),
        });
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(completions))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port for the fixture");
        let addr = listener.local_addr().expect("fixture address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Fixture {
            base_url: format!("http://{addr}/v1"),
            shared,
            server,
        }
    }

    /// The next request gets `scenario` (scripted ones are used in order).
    pub fn push(&self, scenario: Scenario) {
        self.shared.script.lock().unwrap().push(scenario);
    }

    /// Requests without a script entry get `scenario` from now on.
    pub fn set_default(&self, scenario: Scenario) {
        *self.shared.default.lock().unwrap() = scenario;
    }

    /// Lets one waiting `Gated` stream continue.
    pub fn release(&self) {
        self.shared.gate.notify_one();
    }

    /// Requests received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().clone()
    }
}

async fn completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    shared.requests.lock().unwrap().push(Recorded {
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: body.clone(),
    });
    let scenario = {
        let mut script = shared.script.lock().unwrap();
        if script.is_empty() {
            shared.default.lock().unwrap().clone()
        } else {
            script.remove(0)
        }
    };
    match scenario {
        Scenario::Reply(deltas) => sse(futures::stream::iter(
            complete_events(&deltas).into_iter().map(Ok),
        )),
        Scenario::Echo => {
            let last_user = body["messages"]
                .as_array()
                .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
                .and_then(|m| m["content"].as_str())
                .unwrap_or("")
                .to_owned();
            let mid = last_user.char_indices().nth(last_user.chars().count() / 2);
            let (a, b) = last_user.split_at(mid.map_or(0, |(i, _)| i));
            let deltas = vec![a.to_owned(), b.to_owned()];
            sse(futures::stream::iter(
                complete_events(&deltas).into_iter().map(Ok),
            ))
        }
        Scenario::ByteByByte(deltas) => {
            let text: String = complete_events(&deltas).concat().replace("\n", "\r\n");
            let bytes: Vec<Result<Bytes, Infallible>> = text
                .into_bytes()
                .into_iter()
                .map(|b| Ok(Bytes::from(vec![b])))
                .collect();
            sse(futures::stream::iter(bytes))
        }
        Scenario::Status(code, message) => (
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            axum::Json(json!({"error": {"message": message, "type": "server_error"}})),
        )
            .into_response(),
        Scenario::InlineError => sse(futures::stream::iter(
            [
                delta_event("partial"),
                "data: {\"error\":{\"message\":\"model overloaded\"}}\n\n".to_owned(),
            ]
            .into_iter()
            .map(Ok),
        )),
        Scenario::Broken => {
            let gate_owner = shared.clone();
            let first = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(delta_event(
                "partial",
            )))]);
            let broken = futures::stream::once(async move {
                gate_owner.gate.notified().await;
                Err(std::io::Error::other("upstream died"))
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(first.chain(broken)))
                .unwrap()
        }
        Scenario::Truncated => sse(futures::stream::iter([Ok(delta_event("partial"))])),
        Scenario::Stall => {
            sse(futures::stream::iter([Ok(delta_event("partial"))])
                .chain(futures::stream::pending()))
        }
        Scenario::Gated(rest) => {
            let gate_owner = shared.clone();
            let first = futures::stream::iter([Ok::<_, Infallible>(delta_event("first "))]);
            let rest = futures::stream::once(async move {
                gate_owner.gate.notified().await;
                Ok(complete_events(&rest).concat())
            });
            sse(first.chain(rest))
        }
    }
}

fn sse<S, T>(events: S) -> Response
where
    S: futures::Stream<Item = Result<T, Infallible>> + Send + 'static,
    T: Into<Bytes>,
{
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(events.map(|r| r.map(Into::into))))
        .unwrap()
}

fn delta_event(content: &str) -> String {
    let chunk = json!({
        "id": "chatcmpl-fixture",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]
    });
    format!("data: {chunk}\n\n")
}

fn complete_events(deltas: &[String]) -> Vec<String> {
    let mut events = vec![format!(
        "data: {}\n\n",
        json!({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": null}]})
    )];
    // A keep-alive comment, as some providers send, which the parser must skip.
    events.push(": keep-alive\n\n".to_owned());
    events.extend(deltas.iter().map(|d| delta_event(d)));
    events.push(format!(
        "data: {}\n\n",
        json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    ));
    events.push("data: [DONE]\n\n".to_owned());
    events
}
