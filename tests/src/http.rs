//! Plain-HTTP GETs on loopback for the harness, the tests and the bench: etcd's and the
//! service's health endpoints, `/metrics`, the node agent's probes. One reqwest client
//! for all of them, so no caller writes HTTP by hand.

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

/// The User-Agent a kubelet's HTTP probes send (`kube-probe/<version>`); the node agent
/// sends it too, so a service can tell probes from clients in its logs.
pub const PROBE_USER_AGENT: &str = "kube-probe/chatgate-node-agent";

/// Every request here targets loopback and is bounded by the caller's timeout or this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            // Loopback only: a proxy from the environment must never see these.
            .no_proxy()
            // A fresh connection per request, as a probe or a health check makes one:
            // a pooled connection to a process that was just restarted would fail.
            .pool_max_idle_per_host(0)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("a reqwest client with static settings")
    })
}

/// `GET http://{address}{path}`: the status code and the body as text.
pub async fn get(address: SocketAddr, path: &str) -> Result<(u16, String)> {
    let url = format!("http://{address}{path}");
    let response = client()
        .get(&url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = response.status().as_u16();
    let body = response
        .text()
        .await
        .with_context(|| format!("GET {url}: reading the body"))?;
    Ok((status, body))
}

/// `GET http://127.0.0.1:{port}{path}`: the status code and the body as text.
pub async fn get_local(port: u16, path: &str) -> Result<(u16, String)> {
    get(SocketAddr::from(([127, 0, 0, 1], port)), path).await
}

/// `GET http://{address}{path}` as a kubelet's HTTP probe makes it: the status code
/// only, the body left unread.
pub async fn probe(address: SocketAddr, path: &str) -> Result<u16> {
    let url = format!("http://{address}{path}");
    let response = client()
        .get(&url)
        .header(reqwest::header::USER_AGENT, PROBE_USER_AGENT)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    Ok(response.status().as_u16())
}

/// [`get_local`] for code without a runtime of its own (blocking tests).
pub fn get_local_blocking(port: u16, path: &str) -> Result<(u16, String)> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("a runtime for one GET")?
        .block_on(get_local(port, path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot server answering every connection with `response`, recording the
    /// request head it got.
    async fn serve_once(response: &'static str) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let handle = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            stream.write_all(response.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&head).into_owned()
        });
        (address, handle)
    }

    #[tokio::test]
    async fn get_returns_the_status_and_body() {
        let (address, server) =
            serve_once("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 8\r\n\r\nstarting")
                .await;
        let (status, body) = get(address, "/health/startup").await.unwrap();
        assert_eq!((status, body.as_str()), (503, "starting"));
        assert!(
            server
                .await
                .unwrap()
                .starts_with("GET /health/startup HTTP/1.1")
        );
    }

    #[tokio::test]
    async fn a_probe_says_it_is_one() {
        let (address, server) = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
        assert_eq!(probe(address, "/health/ready").await.unwrap(), 200);
        let head = server.await.unwrap().to_ascii_lowercase();
        assert!(
            head.contains(&format!("user-agent: {PROBE_USER_AGENT}")),
            "{head}"
        );
    }

    #[tokio::test]
    async fn nothing_listening_is_an_error_naming_the_url() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let error = get_local(port, "/health").await.unwrap_err();
        assert!(format!("{error}").contains(&format!("127.0.0.1:{port}/health")));
    }
}
