//! Runs the real `chatgate-service` binary on a loopback port and talks to it
//! over real HTTP and WebSocket connections.
#![allow(
    dead_code,
    reason = "each test binary uses its own part of the shared helpers"
)]

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "test-secret-0123456789abcdef-0123456789";
pub const ISSUER: &str = "https://issuer.test";
pub const AUDIENCE: &str = "chat-test";

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long any wait in these tests may take before it counts as a failure.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// A running service process; killed when dropped.
pub struct Service {
    pub child: Child,
    pub addr: String,
    pub dir: tempfile::TempDir,
    started: Instant,
}

/// Builds the environment of one service process.
pub struct ServiceBuilder {
    env: Vec<(String, String)>,
    args: Vec<String>,
    dir: tempfile::TempDir,
}

impl ServiceBuilder {
    /// Development defaults plus a fixed HS256 secret, issuer and audience.
    pub fn new() -> ServiceBuilder {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = ServiceBuilder {
            env: Vec::new(),
            args: Vec::new(),
            dir,
        };
        b = b
            .env("CHATGATE_JWT_SECRET", SECRET)
            .env("CHATGATE_JWT_ISSUER", ISSUER)
            .env("CHATGATE_JWT_AUDIENCE", AUDIENCE)
            .env("CHATGATE_LOG_FORMAT", "json")
            .env("CHATGATE_DRAIN_SECONDS", "0");
        let log = b.dir.path().join("termination-log");
        b.env(
            "CHATGATE_TERMINATION_LOG",
            log.to_str().expect("utf-8 path"),
        )
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn without(mut self, key: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self
    }

    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_string());
        self
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the process on a free loopback port (not waiting for anything).
    pub fn spawn(self) -> Service {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut command = Command::new(env!("CARGO_BIN_EXE_chatgate-service"));
        // Only what the test sets: a developer's own CHATGATE_* must not leak in.
        for (key, _) in std::env::vars() {
            if key.starts_with("CHATGATE_") {
                command.env_remove(key);
            }
        }
        command
            .env("CHATGATE_LISTEN", &addr)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(self.dir.path().join("stdout")).expect("stdout file"))
            .stderr(std::fs::File::create(self.dir.path().join("stderr")).expect("stderr file"))
            .kill_on_drop(true);
        let child = command.spawn().expect("start chatgate-service");
        Service {
            child,
            addr,
            dir: self.dir,
            started: Instant::now(),
        }
    }

    /// Starts the process and waits until `/health/startup` answers 200.
    pub async fn start(self) -> Service {
        let mut service = self.spawn();
        service.wait_started().await;
        service
    }
}

impl Service {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }

    pub fn termination_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("termination-log")).unwrap_or_default()
    }

    /// GET a path: status and JSON body (or `Value::Null` when not JSON). `None`
    /// while the port does not answer.
    pub async fn get(&self, path: &str) -> Option<(u16, Value, reqwest::header::HeaderMap)> {
        get_url(&self.url(path)).await
    }

    /// Waits for `/health/startup` = 200 and returns how long it took from spawn.
    pub async fn wait_started(&mut self) -> Duration {
        let addr = self.addr.clone();
        let r = eventually("/health/startup answers 200", || async {
            let (status, _, _) = get_url(&format!("http://{addr}/health/startup")).await?;
            (status == 200).then_some(())
        })
        .await;
        if r.is_err() {
            panic!(
                "service did not start; stderr:\n{}\nexit: {:?}",
                self.stderr(),
                self.child.try_wait()
            );
        }
        self.started.elapsed()
    }

    /// Waits for the process to exit (bounded).
    pub async fn exit_status(&mut self) -> ExitStatus {
        match tokio::time::timeout(PATIENCE, self.child.wait()).await {
            Ok(Ok(status)) => status,
            _ => panic!("service did not exit in time; stderr:\n{}", self.stderr()),
        }
    }

    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running child has a pid");
        let status = std::process::Command::new("kill")
            .args([format!("-{name}"), pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {pid}");
    }

    /// Opens `/ws` with `Authorization: Bearer <token>` (reads nothing yet).
    pub async fn connect(&self, token: &str) -> Result<Socket, WsError> {
        let mut request = self.ws_url().into_client_request()?;
        request.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
        );
        let (socket, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(socket)
    }

    /// Opens `/ws` as `user` with a valid token and reads the `connected` frame.
    pub async fn connect_as(&self, user: &str) -> Socket {
        let mut socket = self
            .connect(&token(user))
            .await
            .unwrap_or_else(|e| panic!("connect as {user}: {e}"));
        let hello = next_json(&mut socket).await;
        assert_eq!(hello["type"], "connected", "{hello}");
        assert_eq!(hello["user_id"], user, "{hello}");
        socket
    }
}

/// The value of the sample `series` (`name{labels}` exactly as exposed) in a
/// Prometheus text exposition.
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

impl Service {
    /// `/metrics` as text.
    pub async fn metrics(&self) -> String {
        let (status, body, _) = self.get("/metrics").await.expect("/metrics answers");
        assert_eq!(status, 200);
        body.as_str().expect("text exposition").to_owned()
    }
}

pub async fn get_url(url: &str) -> Option<(u16, Value, reqwest::header::HeaderMap)> {
    let response = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.ok()?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Some((status, body, headers))
}

/// Polls `check` until it yields a value, for at most [`PATIENCE`]. Polling with a
/// deadline, never a fixed sleep standing in for "it should be done by now".
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if let Some(v) = check().await {
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("timed out waiting until {what}"))
}

pub fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// A valid HS256 token for `user` with the test issuer and audience.
pub fn token(user: &str) -> String {
    hs256(serde_json::json!({
        "sub": user, "exp": now() + 600, "iss": ISSUER, "aud": AUDIENCE,
    }))
}

pub fn hs256(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

/// The next text frame as JSON, skipping pings; panics on close or timeout.
pub async fn next_json(socket: &mut Socket) -> Value {
    loop {
        let message = tokio::time::timeout(PATIENCE, socket.next())
            .await
            .expect("a frame in time")
            .expect("socket open")
            .expect("no socket error");
        match message {
            Message::Text(text) => return serde_json::from_str(&text).expect("JSON frame"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Reads until the close frame and returns its code (panics if none comes).
pub async fn close_code(socket: &mut Socket) -> u16 {
    loop {
        let next = tokio::time::timeout(PATIENCE, socket.next())
            .await
            .expect("a close frame in time");
        match next {
            Some(Ok(Message::Close(Some(CloseFrame { code, .. })))) => return code.into(),
            Some(Ok(Message::Close(None))) => return 1005,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("socket error before a close frame: {e}"),
            None => panic!("socket ended without a close frame"),
        }
    }
}

pub async fn send_json(socket: &mut Socket, value: Value) {
    socket
        .send(Message::Text(value.to_string().into()))
        .await
        .expect("send");
}

/// Status and JSON body of a refused upgrade.
pub fn refusal(error: WsError) -> (u16, Value) {
    match error {
        WsError::Http(response) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            (status, body)
        }
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}
