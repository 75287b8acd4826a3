//! A bare axum WebSocket ping/pong server — no authentication, no state — that
//! `make bench` runs beside the full service, so the report shows how far the
//! service's auth, metrics, tracing and persistence move it from the floor.
//!
//! Usage: `chatgate-bench-baseline --listen 127.0.0.1:18082`
//!
//! Sockets get the buffer sizes the service uses (1 KiB read buffer, frames written
//! as sent), so the two columns differ by what the service does, not by buffers.
//! `BASELINE_DEFAULT_BUFFERS=1` keeps axum's defaults (128 KiB each) instead, to show
//! what those cost.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::serve::ListenerExt;
use serde::Deserialize;

/// The one field the baseline looks at, parsed like the real servers parse it.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let listen = listen_addr()?;
    let app = Router::new()
        .route("/ws", get(upgrade))
        .route("/health/startup", get(|| async { "ok" }));
    // Like the service: small frames, latency over packet count.
    let listener = tokio::net::TcpListener::bind(listen).await?.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await?;
    Ok(())
}

fn listen_addr() -> anyhow::Result<SocketAddr> {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (Some("--listen"), Some(addr)) => Ok(addr.parse()?),
        _ => anyhow::bail!("usage: chatgate-bench-baseline --listen 127.0.0.1:PORT"),
    }
}

/// The service's per-socket read buffer (`service/src/ws.rs`).
const READ_BUFFER_BYTES: usize = 1024;

async fn upgrade(upgrade: WebSocketUpgrade) -> impl IntoResponse {
    if std::env::var_os("BASELINE_DEFAULT_BUFFERS").is_some_and(|v| v == "1") {
        return upgrade.on_upgrade(serve);
    }
    upgrade
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .on_upgrade(serve)
}

async fn serve(mut socket: WebSocket) {
    while let Some(Ok(message)) = socket.recv().await {
        let Message::Text(text) = message else {
            continue;
        };
        let is_ping = serde_json::from_str::<Frame>(text.as_str()).is_ok_and(|f| f.kind == "ping");
        if !is_ping {
            continue;
        }
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let pong = format!(r#"{{"type":"pong","timestamp":{timestamp}}}"#);
        if socket.send(Message::Text(pong.into())).await.is_err() {
            break;
        }
    }
}
