//! One benchmark client connection: an authenticated WebSocket upgrade (one distinct
//! user per connection), the ping/pong round trip, and a polite close. Every wait
//! has a timeout, so a stuck server fails the phase instead of hanging the run.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use futures::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

pub type Ws = WebSocketStream<TcpStream>;

/// Longest any single network step (upgrade, first frame, pong, close) may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(15);
/// Frames other than the awaited one that are skipped before giving up.
const MAX_SKIPPED_FRAMES: usize = 64;
const PING: &str = r#"{"type":"ping"}"#;

/// Where to connect and what the server says first.
#[derive(Debug, Clone, Copy)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Wait for `{"type":"connected"}` before the connection counts as open.
    pub greets: bool,
}

/// Mints HS256 tokens, each for a user no other connection of the run used.
pub struct TokenMint {
    key: EncodingKey,
    next_user: AtomicU64,
}

#[derive(Serialize)]
struct Claims {
    sub: String,
    iat: u64,
    exp: u64,
}

impl TokenMint {
    pub fn new(secret: &str) -> Self {
        Self {
            key: EncodingKey::from_secret(secret.as_bytes()),
            next_user: AtomicU64::new(0),
        }
    }

    /// `n` tokens for `n` new users, minted before a phase so signing is not timed.
    pub fn mint(&self, n: usize) -> Result<Vec<String>> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        (0..n)
            .map(|_| {
                let user = self.next_user.fetch_add(1, Ordering::Relaxed);
                let claims = Claims {
                    sub: format!("bench-user-{user}"),
                    iat: now,
                    exp: now + 3600,
                };
                Ok(jsonwebtoken::encode(
                    &Header::default(),
                    &claims,
                    &self.key,
                )?)
            })
            .collect()
    }
}

/// The only field of a server frame the benchmark needs.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
}

fn client_config() -> WebSocketConfig {
    // Small client buffers: 4000 idle connections must not cost the generator 1 GiB,
    // and eager writes keep each ping one syscall.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// Opens an authenticated connection; for greeting servers, also waits for `connected`.
pub async fn connect(endpoint: Endpoint, token: &str) -> Result<Ws> {
    Ok(connect_timed(endpoint, token).await?.0)
}

/// Like [`connect`], also telling how long the upgrade alone took (TCP connect to
/// `101`), so a slow greeting can be told from a slow upgrade.
pub async fn connect_timed(endpoint: Endpoint, token: &str) -> Result<(Ws, Duration)> {
    tokio::time::timeout(STEP_TIMEOUT, connect_inner(endpoint, token))
        .await
        .context("connect timed out")?
}

async fn connect_inner(endpoint: Endpoint, token: &str) -> Result<(Ws, Duration)> {
    let started = std::time::Instant::now();
    let stream = TcpStream::connect(endpoint.addr).await?;
    stream.set_nodelay(true)?;
    let mut request = format!("ws://{}/ws", endpoint.addr).into_client_request()?;
    request.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}"))?,
    );
    let (mut ws, _) =
        match tokio_tungstenite::client_async_with_config(request, stream, Some(client_config()))
            .await
        {
            Ok(ok) => ok,
            Err(WsError::Http(response)) => bail!("upgrade refused: HTTP {}", response.status()),
            Err(e) => return Err(e.into()),
        };
    let upgraded = started.elapsed();
    if endpoint.greets {
        await_frame(&mut ws, "connected").await?;
    }
    Ok((ws, upgraded))
}

/// One round trip: send a ping, wait for its pong.
pub async fn ping(ws: &mut Ws) -> Result<()> {
    ws.send(Message::text(PING)).await?;
    await_frame(ws, "pong").await
}

async fn await_frame(ws: &mut Ws, wanted: &str) -> Result<()> {
    for _ in 0..MAX_SKIPPED_FRAMES {
        let message = tokio::time::timeout(STEP_TIMEOUT, ws.next())
            .await
            .with_context(|| format!("no {wanted} within {STEP_TIMEOUT:?}"))?;
        match message {
            Some(Ok(Message::Text(text))) => {
                let frame: Frame = serde_json::from_str(text.as_str())
                    .with_context(|| format!("invalid frame {text}"))?;
                if frame.kind == wanted {
                    return Ok(());
                }
                if frame.kind == "error" {
                    bail!("server error while waiting for {wanted}: {text}");
                }
            }
            Some(Ok(Message::Close(close))) => {
                bail!("closed while waiting for {wanted}: {close:?}")
            }
            // Server pings are answered by tungstenite on the next write or read.
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e).context(format!("waiting for {wanted}")),
            None => bail!("connection ended while waiting for {wanted}"),
        }
    }
    bail!("no {wanted} among {MAX_SKIPPED_FRAMES} frames")
}

/// Reads (and so answers keepalive pings) until the server closes or `stop` fires;
/// then closes politely.
pub async fn hold_idle(mut ws: Ws, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            message = ws.next() => match message {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
    close(ws).await;
}

/// Sends a close frame and waits (bounded) for the server's, so the server's side of
/// the teardown happens while its CPU time is being measured.
pub async fn close(mut ws: Ws) {
    let _ = tokio::time::timeout(STEP_TIMEOUT, async {
        if ws.close(None).await.is_err() {
            return;
        }
        for _ in 0..MAX_SKIPPED_FRAMES {
            match ws.next().await {
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            }
        }
    })
    .await;
}
