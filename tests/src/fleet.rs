//! A fleet of chat clients that behave as a good client of `docs/protocol.md` does,
//! and count everything a person would notice going wrong while a service is rolled.
//!
//! Each client is one user with one socket. It pings on a period, sends one
//! `user_message` at a time (the next only after the reply is stored), and carries a
//! `client_message_id` on each so that a retry is safe. When its socket closes with
//! 1012, 1013 or 1001 (or any other way) it reconnects with jittered exponential
//! backoff and sends its unfinished message again with the same id; `run_interrupted`,
//! `shutting_down`, `storage_unavailable`, `llm_unavailable` and `rate_limited` make it
//! send the message again after a pause.
//!
//! When the fleet is told to finish it stops starting messages, lets the unfinished
//! ones complete (within a deadline), reads each client's thread back page by page
//! and compares: a message the service acknowledged (`agent_started`, sent only
//! after the message is stored) and then missing from the thread is **lost**; one
//! present more than once is **duplicated**.
//!
//! Every loop here is bounded: the number of clients, the message period and the
//! finishing deadline are the caller's, and each connect and read has a timeout.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long an upgrade may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First and largest reconnect back-off (each is jittered between half and all).
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(3);
/// How long a client waits for an answer while reading its thread back.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The page size used to read a thread back (the protocol's maximum).
const PAGE: u32 = 200;
/// Error codes after which a good client sends the same message again.
const RESEND_ON: [&str; 5] = [
    "run_interrupted",
    "shutting_down",
    "storage_unavailable",
    "llm_unavailable",
    "rate_limited",
];

/// What the fleet does.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    /// The WebSocket URL, e.g. `ws://127.0.0.1:PORT/ws`.
    pub url: String,
    /// One `(user, bearer token)` per client.
    pub users: Vec<(String, String)>,
    /// How often each client starts a message (jittered ±50 %), once the previous
    /// one's reply is stored.
    pub message_every: Duration,
    /// How often each client pings.
    pub ping_every: Duration,
}

/// Everything the fleet counted, across its clients.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetReport {
    pub clients: usize,
    /// Successful upgrades (first connections and reconnections).
    pub connections: u64,
    /// Upgrades that did not succeed, by kind (`http_503`, `refused`, `timeout`, ...).
    pub failed_upgrades: BTreeMap<String, u64>,
    /// Upgrades answered with a 5xx status.
    pub http_5xx: u64,
    /// Closes by code, as the client saw them (1006: no close frame at all).
    pub closes: BTreeMap<u16, u64>,
    /// `error` frames by code.
    pub errors: BTreeMap<String, u64>,
    /// `user_message` frames sent, retries included.
    pub messages_sent: u64,
    /// Messages the service acknowledged as stored.
    pub messages_acknowledged: u64,
    /// Messages whose reply was stored (`agent_completed`).
    pub messages_completed: u64,
    /// Acknowledged, then missing from the thread.
    pub lost: u64,
    /// Present in the thread more than once (each extra copy counts).
    pub duplicated: u64,
    /// Clients whose thread could not be read back before the deadline.
    pub unverified_clients: u64,
}

impl FleetReport {
    pub fn failed_upgrades_total(&self) -> u64 {
        self.failed_upgrades.values().sum()
    }

    pub fn closes_with(&self, code: u16) -> u64 {
        self.closes.get(&code).copied().unwrap_or(0)
    }

    /// Closes other than 1012, 1013, 1001 (what a rollout and overload may send)
    /// and 1000 (the fleet's own goodbye).
    pub fn unexpected_closes(&self) -> u64 {
        self.closes
            .iter()
            .filter(|(code, _)| ![1000, 1001, 1012, 1013].contains(*code))
            .map(|(_, n)| n)
            .sum()
    }

    /// Everything a user would call a failure.
    pub fn failures(&self) -> u64 {
        self.failed_upgrades_total()
            + self.closes_with(1011)
            + self.lost
            + self.duplicated
            + self.unverified_clients
    }
}

/// Counters the clients update as they go.
#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    http_5xx: AtomicU64,
    messages_sent: AtomicU64,
    messages_acknowledged: AtomicU64,
    messages_completed: AtomicU64,
    lost: AtomicU64,
    duplicated: AtomicU64,
    unverified: AtomicU64,
    failed_upgrades: Mutex<BTreeMap<String, u64>>,
    closes: Mutex<BTreeMap<u16, u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    fn bump<K: Ord>(map: &Mutex<BTreeMap<K, u64>>, key: K) {
        *map.lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default() += 1;
    }

    fn copy<K: Ord + Clone>(map: &Mutex<BTreeMap<K, u64>>) -> BTreeMap<K, u64> {
        map.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn report(&self, clients: usize) -> FleetReport {
        let read = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FleetReport {
            clients,
            connections: read(&self.connections),
            failed_upgrades: Counters::copy(&self.failed_upgrades),
            http_5xx: read(&self.http_5xx),
            closes: Counters::copy(&self.closes),
            errors: Counters::copy(&self.errors),
            messages_sent: read(&self.messages_sent),
            messages_acknowledged: read(&self.messages_acknowledged),
            messages_completed: read(&self.messages_completed),
            lost: read(&self.lost),
            duplicated: read(&self.duplicated),
            unverified_clients: read(&self.unverified),
        }
    }
}

/// Where the fleet is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Running,
    /// No new messages; finish the unfinished ones, read the threads back, close.
    Finishing {
        deadline: Instant,
    },
}

/// A running fleet.
pub struct Fleet {
    stage: watch::Sender<Stage>,
    counters: Arc<Counters>,
    clients: Vec<JoinHandle<()>>,
}

impl Fleet {
    /// Starts every client at once; each connects and begins its loop.
    pub fn start(options: FleetOptions) -> Fleet {
        let (stage, watcher) = watch::channel(Stage::Running);
        let counters = Arc::new(Counters::default());
        let options = Arc::new(options);
        let clients = (0..options.users.len())
            .map(|index| {
                let client = Client {
                    index,
                    options: options.clone(),
                    counters: counters.clone(),
                    stage: watcher.clone(),
                    jitter: Jitter::new(index as u64),
                    thread_id: None,
                    next_message: 0,
                    unfinished: None,
                    acknowledged: Vec::new(),
                };
                tokio::spawn(client.run())
            })
            .collect();
        Fleet {
            stage,
            counters,
            clients,
        }
    }

    /// What has been counted so far (lost and duplicated are known after [`finish`]).
    ///
    /// [`finish`]: Fleet::finish
    pub fn snapshot(&self) -> FleetReport {
        self.counters.report(self.clients.len())
    }

    /// Successful upgrades so far.
    pub fn connections(&self) -> u64 {
        self.counters.connections.load(Ordering::Relaxed)
    }

    /// Stops starting messages, waits up to `within` for the unfinished ones and
    /// the read-back of every thread, and reports.
    pub async fn finish(self, within: Duration) -> FleetReport {
        let deadline = Instant::now() + within;
        let _ = self.stage.send(Stage::Finishing { deadline });
        let clients = self.clients.len();
        for client in self.clients {
            // A client past the deadline is counted unverified, by itself.
            let left = deadline.saturating_duration_since(Instant::now()) + READ_TIMEOUT;
            let aborter = client.abort_handle();
            if tokio::time::timeout(left, client).await.is_err() {
                aborter.abort();
                self.counters.unverified.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.counters.report(clients)
    }
}

/// A message sent and not yet answered with a stored reply.
#[derive(Clone, Debug)]
struct Unfinished {
    client_message_id: String,
    content: String,
    /// The run answering it, once `agent_started` named it.
    run_id: Option<String>,
    /// Whether it has to be sent (again) on the current socket, and not before.
    send_at: Option<Instant>,
}

struct Client {
    index: usize,
    options: Arc<FleetOptions>,
    counters: Arc<Counters>,
    stage: watch::Receiver<Stage>,
    jitter: Jitter,
    thread_id: Option<String>,
    next_message: u64,
    unfinished: Option<Unfinished>,
    /// `(client_message_id, content)` of every message the service acknowledged.
    acknowledged: Vec<(String, String)>,
}

/// How one socket's life ended.
enum SessionEnd {
    /// Closed (by either side) with this code; 1006 when no close frame came.
    Closed(u16),
    /// Finishing and verified: the client is done.
    Done,
}

impl Client {
    async fn run(mut self) {
        let mut backoff = BACKOFF_START;
        loop {
            if self.past_deadline() {
                self.counters.unverified.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let socket = match self.connect().await {
                Ok(socket) => socket,
                Err(kind) => {
                    Counters::bump(&self.counters.failed_upgrades, kind);
                    tokio::time::sleep(self.jitter.half_to_full(backoff)).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            self.counters.connections.fetch_add(1, Ordering::Relaxed);
            backoff = BACKOFF_START;
            match self.session(socket).await {
                SessionEnd::Done => return,
                SessionEnd::Closed(code) => {
                    Counters::bump(&self.counters.closes, code);
                    // A drain (1012), overload (1013) or going-away (1001) asks for a
                    // reconnect; a short jittered pause spreads a rollout's clients.
                    tokio::time::sleep(self.jitter.half_to_full(BACKOFF_START)).await;
                }
            }
        }
    }

    fn past_deadline(&self) -> bool {
        matches!(*self.stage.borrow(), Stage::Finishing { deadline } if Instant::now() > deadline)
    }

    /// One upgrade; the kind of failure when it does not succeed.
    async fn connect(&self) -> Result<Socket, String> {
        let (_, token) = &self.options.users[self.index];
        let mut request = self
            .options
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| format!("bad_request: {e}"))?;
        request.headers_mut().insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}")
                .parse()
                .map_err(|_| "bad_token".to_owned())?,
        );
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(request)).await
        {
            Err(_) => Err("timeout".into()),
            Ok(Ok((socket, _))) => Ok(socket),
            Ok(Err(tungstenite::Error::Http(response))) => {
                let status = response.status().as_u16();
                if status >= 500 {
                    self.counters.http_5xx.fetch_add(1, Ordering::Relaxed);
                }
                Err(format!("http_{status}"))
            }
            Ok(Err(tungstenite::Error::Io(e))) => Err(match e.kind() {
                std::io::ErrorKind::ConnectionRefused => "refused".into(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof => {
                    "reset".into()
                }
                _ => "io".into(),
            }),
            Ok(Err(tungstenite::Error::Protocol(_) | tungstenite::Error::ConnectionClosed)) => {
                Err("reset".into())
            }
            Ok(Err(_)) => Err("other".into()),
        }
    }

    /// One socket: pings, messages, events, until it closes or the client is done.
    async fn session(&mut self, mut socket: Socket) -> SessionEnd {
        let mut ping = tokio::time::interval(self.options.ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_message =
            Instant::now() + self.jitter.half_to_full(self.options.message_every);
        if let Some(unfinished) = self.unfinished.as_mut() {
            // A new socket: the unfinished message goes again, with the same id.
            unfinished.send_at = Some(Instant::now());
            unfinished.run_id = None;
        }
        loop {
            let finishing = !matches!(*self.stage.borrow(), Stage::Running);
            if finishing && self.unfinished.is_none() {
                return self.verify(socket).await;
            }
            if self.past_deadline() {
                self.counters.unverified.fetch_add(1, Ordering::Relaxed);
                let _ = socket.close(None).await;
                return SessionEnd::Done;
            }
            if self.unfinished.is_none() && !finishing && Instant::now() >= next_message {
                self.unfinished = Some(self.new_message());
            }
            if let Some(unfinished) = self.unfinished.as_mut()
                && unfinished.send_at.is_some_and(|at| Instant::now() >= at)
            {
                unfinished.send_at = None;
                let mut frame = json!({
                    "type": "user_message",
                    "content": unfinished.content,
                    "client_message_id": unfinished.client_message_id,
                });
                if let Some(thread) = &self.thread_id {
                    frame["thread_id"] = json!(thread);
                }
                self.counters.messages_sent.fetch_add(1, Ordering::Relaxed);
                if socket.send(Message::text(frame.to_string())).await.is_err() {
                    return SessionEnd::Closed(1006);
                }
            }
            let wake = tokio::time::sleep(Duration::from_millis(50));
            tokio::select! {
                _ = ping.tick() => {
                    if socket.send(Message::text(r#"{"type":"ping"}"#)).await.is_err() {
                        return SessionEnd::Closed(1006);
                    }
                }
                frame = socket.next() => match frame {
                    Some(Ok(Message::Text(text))) => {
                        if let Ok(event) = serde_json::from_str::<Value>(&text)
                            && self.on_event(&event)
                        {
                            next_message = Instant::now()
                                + self.jitter.half_to_full(self.options.message_every);
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        return SessionEnd::Closed(frame.map_or(1005, |f| u16::from(f.code)));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return SessionEnd::Closed(1006),
                },
                _ = wake => {}
            }
        }
    }

    fn new_message(&mut self) -> Unfinished {
        let (user, _) = &self.options.users[self.index];
        let n = self.next_message;
        self.next_message += 1;
        Unfinished {
            client_message_id: format!("{user}-m{n}"),
            content: format!("fleet message {n} from {user}"),
            run_id: None,
            send_at: Some(Instant::now()),
        }
    }

    /// Handles one server event; true when the unfinished message just completed.
    fn on_event(&mut self, event: &Value) -> bool {
        let kind = event["type"].as_str().unwrap_or_default();
        let Some(unfinished) = self.unfinished.as_mut() else {
            if kind == "error" {
                self.count_error(event);
            }
            return false;
        };
        match kind {
            "agent_started"
                if event["client_message_id"].as_str()
                    == Some(unfinished.client_message_id.as_str()) =>
            {
                unfinished.run_id = event["run_id"].as_str().map(str::to_owned);
                if self.thread_id.is_none() {
                    self.thread_id = event["thread_id"].as_str().map(str::to_owned);
                }
                let id = unfinished.client_message_id.clone();
                if !self.acknowledged.iter().any(|(known, _)| *known == id) {
                    self.counters
                        .messages_acknowledged
                        .fetch_add(1, Ordering::Relaxed);
                    self.acknowledged.push((id, unfinished.content.clone()));
                }
                false
            }
            "agent_completed"
                if unfinished.run_id.is_some()
                    && event["run_id"].as_str() == unfinished.run_id.as_deref() =>
            {
                self.counters
                    .messages_completed
                    .fetch_add(1, Ordering::Relaxed);
                self.unfinished = None;
                true
            }
            "error" => {
                let code = event["code"].as_str().unwrap_or_default().to_owned();
                self.count_error(event);
                if RESEND_ON.contains(&code.as_str()) {
                    let pause = self.jitter.half_to_full(Duration::from_millis(500));
                    if let Some(unfinished) = self.unfinished.as_mut() {
                        unfinished.run_id = None;
                        unfinished.send_at = Some(Instant::now() + pause);
                    }
                }
                false
            }
            _ => false,
        }
    }

    fn count_error(&self, event: &Value) {
        let code = event["code"].as_str().unwrap_or("no_code").to_owned();
        Counters::bump(&self.counters.errors, code);
    }

    /// Reads the client's thread back and counts lost and duplicated messages;
    /// then says goodbye with 1000.
    async fn verify(&mut self, mut socket: Socket) -> SessionEnd {
        let Some(thread_id) = self.thread_id.clone() else {
            // Never acknowledged a message: nothing to compare.
            let _ = socket.close(Some(goodbye())).await;
            return SessionEnd::Done;
        };
        let mut contents: BTreeMap<String, u64> = BTreeMap::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut request = json!({"type": "get_thread", "thread_id": thread_id, "limit": PAGE});
            if let Some(cursor) = &cursor {
                request["cursor"] = json!(cursor);
            }
            if socket
                .send(Message::text(request.to_string()))
                .await
                .is_err()
            {
                return SessionEnd::Closed(1006);
            }
            let page = loop {
                match tokio::time::timeout(READ_TIMEOUT, socket.next()).await {
                    Ok(Some(Ok(Message::Text(text)))) => {
                        let Ok(event) = serde_json::from_str::<Value>(&text) else {
                            continue;
                        };
                        match event["type"].as_str() {
                            Some("thread") => break event,
                            Some("error") => {
                                // Most likely storage briefly unavailable: ask again.
                                self.count_error(&event);
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                if socket
                                    .send(Message::text(request.to_string()))
                                    .await
                                    .is_err()
                                {
                                    return SessionEnd::Closed(1006);
                                }
                            }
                            _ => {}
                        }
                    }
                    Ok(Some(Ok(Message::Close(frame)))) => {
                        return SessionEnd::Closed(frame.map_or(1005, |f| u16::from(f.code)));
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(_)) | None) => return SessionEnd::Closed(1006),
                    Err(_) => return SessionEnd::Closed(1006),
                }
            };
            for message in page["messages"].as_array().into_iter().flatten() {
                if message["role"] == "user"
                    && let Some(content) = message["content"].as_str()
                {
                    *contents.entry(content.to_owned()).or_default() += 1;
                }
            }
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
        }
        let lost = self
            .acknowledged
            .iter()
            .filter(|(_, content)| !contents.contains_key(content))
            .count() as u64;
        let duplicated = contents.values().map(|n| n.saturating_sub(1)).sum::<u64>();
        self.counters.lost.fetch_add(lost, Ordering::Relaxed);
        self.counters
            .duplicated
            .fetch_add(duplicated, Ordering::Relaxed);
        let _ = socket.close(Some(goodbye())).await;
        Counters::bump(&self.counters.closes, 1000);
        SessionEnd::Done
    }
}

fn goodbye() -> CloseFrame {
    CloseFrame {
        code: CloseCode::Normal,
        reason: "fleet finished".into(),
    }
}

/// A small deterministic generator per client (splitmix64), so backoffs spread
/// without a shared random source.
struct Jitter(u64);

impl Jitter {
    fn new(seed: u64) -> Jitter {
        Jitter(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A duration between half of `d` and all of it.
    fn half_to_full(&mut self, d: Duration) -> Duration {
        let half = d / 2;
        let spread = half.as_micros().max(1) as u64;
        half + Duration::from_micros(self.next() % spread)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_between_half_and_all() {
        let mut jitter = Jitter::new(7);
        for _ in 0..1000 {
            let d = jitter.half_to_full(Duration::from_millis(200));
            assert!(d >= Duration::from_millis(100) && d <= Duration::from_millis(200));
        }
    }

    #[test]
    fn a_report_counts_every_kind_of_failure_and_no_rollout_close() {
        let mut report = FleetReport::default();
        report.closes.insert(1012, 40);
        report.closes.insert(1000, 200);
        assert_eq!(report.failures(), 0);
        assert_eq!(report.unexpected_closes(), 0);
        report.closes.insert(1011, 1);
        report.failed_upgrades.insert("http_503".into(), 2);
        report.lost = 1;
        report.duplicated = 1;
        assert_eq!(report.failures(), 5);
        assert_eq!(report.unexpected_closes(), 1);
    }
}
