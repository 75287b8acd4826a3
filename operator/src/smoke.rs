//! `chatgate-operator smoke`: what a pipeline runs after `kubectl apply` or `gcloud run
//! services replace` — the health endpoint, a real WebSocket upgrade with a token, a
//! ping, and one chat round trip through the five agent events — printed as a table.
//! Any failed check makes the exit status non-zero; nothing here panics on what a
//! server answers, and no token or secret is ever printed.

use chatgate_contract::paths;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};

/// The five events every run emits, in order (docs/protocol.md).
pub const AGENT_EVENTS: [&str; 5] = [
    "agent_started",
    "agent_thinking",
    "tool_executing",
    "tool_completed",
    "agent_completed",
];

#[derive(clap::Args, Debug, Clone)]
pub struct SmokeArgs {
    /// The service's WebSocket URL: `ws://HOST[:PORT]/ws` or `wss://HOST/ws`. Its health
    /// endpoint is the sibling path /health.
    #[arg(long)]
    pub url: String,
    /// A token to connect with. Prefer the environment variable, which keeps the token
    /// out of the process list and shell history.
    #[arg(
        long,
        env = "CHATGATE_SMOKE_TOKEN",
        hide_env_values = true,
        conflicts_with = "jwt_secret_from"
    )]
    pub token: Option<String>,
    /// Sign a short-lived HS256 token with the service's JWT secret, read from
    /// `env:NAME` or `file:PATH` (a mounted Secret).
    #[arg(long, value_name = "env:NAME|file:PATH")]
    pub jwt_secret_from: Option<String>,
    /// The `iss` claim of the signed token (the service's CHATGATE_JWT_ISSUER).
    #[arg(long, requires = "jwt_secret_from")]
    pub jwt_issuer: Option<String>,
    /// The `aud` claim of the signed token (the service's CHATGATE_JWT_AUDIENCE).
    #[arg(long, requires = "jwt_secret_from")]
    pub jwt_audience: Option<String>,
    /// The user (`sub`) the signed token names; the chat round trip stores a thread
    /// for this user.
    #[arg(long, default_value = "chatgate-smoke", requires = "jwt_secret_from")]
    pub user: String,
    /// Seconds each check may take.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
    /// `table` (for people) or `json` (one object per check, for pipelines).
    #[arg(long, default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

/// One check's outcome, a row of the table.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub millis: u64,
    pub detail: String,
}

/// What went wrong before any check could run (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("--url {0:?} is not a ws:// or wss:// URL: {1}")]
    Url(String, String),
    #[error(
        "give a token (--token or CHATGATE_SMOKE_TOKEN) or --jwt-secret-from env:NAME|file:PATH"
    )]
    NoCredentials,
    #[error("--jwt-secret-from {0:?}: {1}")]
    Secret(String, String),
    #[error("signing the smoke token: {0}")]
    Sign(String),
}

/// The health URL beside a WebSocket URL: `ws://h/ws` → `http://h/health`, and
/// `wss://h/prefix/ws` → `https://h/prefix/health`.
pub fn health_url(ws_url: &str) -> Result<reqwest::Url, UsageError> {
    let bad = |why: &str| UsageError::Url(ws_url.to_owned(), why.to_owned());
    let mut url = reqwest::Url::parse(ws_url).map_err(|e| bad(&e.to_string()))?;
    let scheme = match url.scheme() {
        "ws" => "http",
        "wss" => "https",
        other => return Err(bad(&format!("the scheme is {other}"))),
    };
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("it has no host"));
    }
    url.set_scheme(scheme)
        .map_err(|()| bad("the scheme cannot change"))?;
    let path = url.path().to_owned();
    let base = path.strip_suffix(paths::WS).unwrap_or("");
    url.set_path(&format!("{base}{}", paths::HEALTH));
    url.set_query(None);
    Ok(url)
}

/// Reads a secret from `env:NAME` or `file:PATH`; errors name the source, never the value.
pub fn read_secret(source: &str) -> Result<String, UsageError> {
    let fail = |why: String| UsageError::Secret(source.to_owned(), why);
    let value = if let Some(name) = source.strip_prefix("env:") {
        std::env::var(name)
            .map_err(|_| fail(format!("the environment variable {name} is not set")))?
    } else if let Some(path) = source.strip_prefix("file:") {
        std::fs::read_to_string(path).map_err(|e| fail(format!("reading {path}: {e}")))?
    } else {
        return Err(fail("say env:NAME or file:PATH".into()));
    };
    let value = value.trim_end_matches(['\n', '\r']).to_owned();
    if value.is_empty() {
        return Err(fail("it is empty".into()));
    }
    Ok(value)
}

/// The token to connect with: the one given, or one signed for `args.user` (valid for
/// five minutes, enough for one smoke run).
pub fn token(args: &SmokeArgs) -> Result<String, UsageError> {
    if let Some(token) = &args.token {
        return Ok(token.clone());
    }
    let Some(source) = &args.jwt_secret_from else {
        return Err(UsageError::NoCredentials);
    };
    let secret = read_secret(source)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut claims = json!({"sub": args.user, "iat": now, "exp": now + 300});
    if let Some(iss) = &args.jwt_issuer {
        claims["iss"] = json!(iss);
    }
    if let Some(aud) = &args.jwt_audience {
        claims["aud"] = json!(aud);
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| UsageError::Sign(e.to_string()))
}

/// Runs every check in order. Checks after a failed upgrade are reported as not run.
pub async fn run(args: &SmokeArgs) -> Result<Vec<Check>, UsageError> {
    let health = health_url(&args.url)?;
    let token = token(args)?;
    let limit = Duration::from_secs(args.timeout.max(1));
    let mut checks = vec![timed("health", check_health(&health, limit)).await];

    let started = Instant::now();
    let socket = tokio::time::timeout(limit, connect(&args.url, &token))
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {}s", limit.as_secs())));
    let mut socket = match socket {
        Ok((socket, detail)) => {
            checks.push(check("upgrade", started, Ok(detail)));
            socket
        }
        Err(detail) => {
            checks.push(check("upgrade", started, Err(detail)));
            for name in ["ping", "chat"] {
                checks.push(Check {
                    name,
                    ok: false,
                    millis: 0,
                    detail: "not run: no WebSocket".into(),
                });
            }
            return Ok(checks);
        }
    };
    checks.push(timed("ping", bounded(limit, ping(&mut socket))).await);
    checks.push(timed("chat", bounded(limit, chat(&mut socket))).await);
    let _ = socket.close(None).await;
    Ok(checks)
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn bounded(
    limit: Duration,
    work: impl Future<Output = Result<String, String>>,
) -> Result<String, String> {
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {}s", limit.as_secs())))
}

async fn timed(name: &'static str, work: impl Future<Output = Result<String, String>>) -> Check {
    let started = Instant::now();
    let outcome = work.await;
    check(name, started, outcome)
}

fn check(name: &'static str, started: Instant, outcome: Result<String, String>) -> Check {
    let millis = started.elapsed().as_millis() as u64;
    match outcome {
        Ok(detail) => Check {
            name,
            ok: true,
            millis,
            detail,
        },
        Err(detail) => Check {
            name,
            ok: false,
            millis,
            detail,
        },
    }
}

async fn check_health(url: &reqwest::Url, limit: Duration) -> Result<String, String> {
    let response = reqwest::Client::new()
        .get(url.clone())
        .timeout(limit)
        .send()
        .await
        .map_err(|e| format!("{url} cannot be reached: {}", error_chain(&e)))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let state = body["state"].as_str().unwrap_or("unknown");
    let services = body["services"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let ready = services.iter().filter(|s| s["state"] == "ready").count();
    if status.is_success() && state == "ready" {
        return Ok(format!(
            "ready: {ready}/{} critical services",
            services.len()
        ));
    }
    if state == "starting" {
        let phase = body["phase"].as_str().unwrap_or("unknown");
        return Err(format!(
            "not ready yet: startup is in phase {phase} ({ready}/{} critical services); run again shortly",
            services.len()
        ));
    }
    let missing: Vec<&str> = services
        .iter()
        .filter(|s| s["state"] != "ready")
        .filter_map(|s| s["name"].as_str())
        .collect();
    Err(if missing.is_empty() {
        format!("{url} answered {status} (state {state})")
    } else {
        format!(
            "{url} answered {status} (state {state}); not ready: {}",
            missing.join(", ")
        )
    })
}

async fn connect(url: &str, token: &str) -> Result<(Socket, String), String> {
    let mut request = url
        .into_client_request()
        .map_err(|e| format!("building the upgrade request: {e}"))?;
    let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| "the token holds characters a header cannot carry".to_owned())?;
    request.headers_mut().insert("authorization", bearer);
    let (mut socket, _) = match tokio_tungstenite::connect_async(request).await {
        Ok(pair) => pair,
        Err(tungstenite::Error::Http(response)) => {
            return Err(refusal(
                response.status().as_u16(),
                response.headers(),
                response.body(),
            ));
        }
        Err(e) => return Err(format!("{url}: {}", error_chain(&e))),
    };
    let hello = next_json(&mut socket).await?;
    if hello["type"] != "connected" {
        return Err(format!(
            "expected a connected frame first, got {}",
            short(&hello)
        ));
    }
    Ok((
        socket,
        format!(
            "101; connected as {} (protocol {})",
            hello["user_id"].as_str().unwrap_or("?"),
            hello["protocol"]
        ),
    ))
}

/// Says why the server refused the upgrade, from its status and JSON body.
fn refusal(status: u16, headers: &tungstenite::http::HeaderMap, body: &Option<Vec<u8>>) -> String {
    let body: Value = body
        .as_deref()
        .and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or(Value::Null);
    let said = body["message"]
        .as_str()
        .or_else(|| body["error"].as_str())
        .unwrap_or("");
    let said = if said.is_empty() {
        String::new()
    } else {
        format!(": {said}")
    };
    match status {
        401 => format!("token refused (401){said}"),
        403 => format!("forbidden (403){said}"),
        503 => {
            let retry = headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(|s| format!(", Retry-After {s}s"))
                .unwrap_or_default();
            format!("not ready yet (503{retry}){said}")
        }
        other => format!("upgrade refused with HTTP {other}{said}"),
    }
}

async fn ping(socket: &mut Socket) -> Result<String, String> {
    send(socket, json!({"type": "ping"})).await?;
    let frame = next_json(socket).await?;
    if frame["type"] == "pong" {
        Ok("pong".into())
    } else {
        Err(format!("expected pong, got {}", short(&frame)))
    }
}

async fn chat(socket: &mut Socket) -> Result<String, String> {
    let id = format!(
        "smoke-{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );
    send(
        socket,
        json!({"type": "user_message", "content": "chatgate smoke check", "client_message_id": id}),
    )
    .await?;
    let mut seen: Vec<String> = Vec::new();
    loop {
        let frame = next_json(socket).await?;
        let kind = frame["type"].as_str().unwrap_or("").to_owned();
        match kind.as_str() {
            "error" => {
                return Err(format!(
                    "error {} after {}: {}",
                    frame["code"].as_str().unwrap_or("?"),
                    summary(&seen),
                    frame["message"].as_str().unwrap_or("")
                ));
            }
            "agent_completed" => {
                seen.push(kind);
                break;
            }
            // Frames for other sockets' business (none expected on a fresh one).
            "pong" | "threads" | "thread" => {}
            _ => seen.push(kind),
        }
    }
    let missing: Vec<&str> = AGENT_EVENTS
        .iter()
        .filter(|e| !seen.iter().any(|s| s == *e))
        .copied()
        .collect();
    if missing.is_empty() {
        Ok(summary(&seen))
    } else {
        Err(format!(
            "missing {}; got {}",
            missing.join(", "),
            summary(&seen)
        ))
    }
}

/// `agent_started → agent_response ×3 → …`: the events in order, runs folded.
fn summary(events: &[String]) -> String {
    if events.is_empty() {
        return "no events".into();
    }
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < events.len() {
        let run = events[i..].iter().take_while(|e| **e == events[i]).count();
        out.push(if run > 1 {
            format!("{} ×{run}", events[i])
        } else {
            events[i].clone()
        });
        i += run;
    }
    out.join(" → ")
}

async fn send(socket: &mut Socket, frame: Value) -> Result<(), String> {
    socket
        .send(Message::text(frame.to_string()))
        .await
        .map_err(|e| format!("sending: {}", error_chain(&e)))
}

async fn next_json(socket: &mut Socket) -> Result<Value, String> {
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => {
                return serde_json::from_str(&text)
                    .map_err(|e| format!("a frame that is not JSON ({e})"));
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(match frame {
                    Some(f) => format!(
                        "the server closed the socket: {} {}",
                        u16::from(f.code),
                        f.reason
                    ),
                    None => "the server closed the socket".into(),
                });
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("reading: {}", error_chain(&e))),
            None => return Err("the connection ended".into()),
        }
    }
}

fn short(frame: &Value) -> String {
    let text = frame.to_string();
    crate::conditions::truncate(&text, 200)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let _ = write!(text, ": {s}");
        source = s.source();
    }
    text
}

/// The table people read.
pub fn table(checks: &[Check]) -> String {
    let mut out = format!(
        "{:<8}  {:<6}  {:>8}  {}\n",
        "CHECK", "RESULT", "TIME", "DETAIL"
    );
    for c in checks {
        let _ = writeln!(
            out,
            "{:<8}  {:<6}  {:>5} ms  {}",
            c.name,
            if c.ok { "ok" } else { "FAILED" },
            c.millis,
            c.detail
        );
    }
    out
}

/// The exit status: 0 when every check passed.
pub fn passed(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_health_url_sits_beside_the_websocket() {
        assert_eq!(
            health_url("ws://127.0.0.1:8080/ws").unwrap().as_str(),
            "http://127.0.0.1:8080/health"
        );
        assert_eq!(
            health_url("wss://chat.example.com/api/ws?x=1")
                .unwrap()
                .as_str(),
            "https://chat.example.com/api/health"
        );
        for bad in ["http://h/ws", "not a url", "ws://:8080/ws"] {
            assert!(health_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_secret_source_is_named_never_its_value() {
        let e = read_secret("env:CHATGATE_SMOKE_TEST_UNSET_VARIABLE").unwrap_err();
        assert!(
            e.to_string().contains("CHATGATE_SMOKE_TEST_UNSET_VARIABLE"),
            "{e}"
        );
        let e = read_secret("hunter2-literal").unwrap_err();
        assert!(e.to_string().contains("env:NAME or file:PATH"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "s3cret-value\n").unwrap();
        assert_eq!(
            read_secret(&format!("file:{}", path.display())).unwrap(),
            "s3cret-value"
        );
    }

    #[test]
    fn refusals_say_what_to_do() {
        let mut headers = tungstenite::http::HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("1"));
        let body = Some(br#"{"error":"starting","message":"startup has not completed (phase storage); retry shortly"}"#.to_vec());
        assert_eq!(
            refusal(503, &headers, &body),
            "not ready yet (503, Retry-After 1s): startup has not completed (phase storage); retry shortly"
        );
        assert!(refusal(401, &Default::default(), &None).starts_with("token refused (401)"));
    }

    #[test]
    fn event_runs_are_folded() {
        let events: Vec<String> = ["a", "b", "b", "b", "c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(summary(&events), "a → b ×3 → c");
    }
}
