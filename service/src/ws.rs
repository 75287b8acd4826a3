//! `/ws`: the upgrade (origin, token, connection limits — all checked before the
//! upgrade completes) and the per-socket loop that speaks the wire protocol.
//!
//! One task per socket, and nothing else per socket until the client asks for a
//! chat: the agent event queue is created on the first chat request, so an idle
//! socket costs its task, its small read buffer and a few counters.

use crate::auth::{self, UserId};
use crate::bridge::{Admission, OverLimit};
use crate::chat::{ChatLane, LaneEvent, Submitted};
use crate::instance::ServiceInstance;
use crate::protocol::{self, ClientRequest, ErrorCode, ServerEvent};
use crate::replicas::{ConnectionSlot, Delivery};
use crate::startup::CriticalServices;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chatgate_contract::HealthState;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

/// The longest a token's expiry is waited for (a timer further out adds nothing: no
/// socket lives that long, and an `Instant` that far ahead could overflow).
const MAX_TOKEN_WAIT: Duration = Duration::from_secs(366 * 24 * 3600);

/// Initial read buffer per socket. Chat frames are small; tungstenite grows the
/// buffer for a larger frame (up to the message limit) when one arrives. The
/// default (128 KiB) would make every idle socket cost more than the whole budget.
const READ_BUFFER_BYTES: usize = 1024;
/// How long a closing socket waits for the client's close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Seconds a refused `/ws` client is told to wait (`Retry-After`).
const RETRY_AFTER_SECONDS: &str = "1";

/// Why a `/ws` request got the answer it got: the `result` label of
/// `chatgate_ws_upgrades_total`, carried on the response to where it is counted.
#[derive(Clone, Copy, Debug)]
pub(crate) struct UpgradeResult(pub(crate) &'static str);

/// `response`, marked with why it was given.
pub(crate) fn tagged(mut response: Response, result: &'static str) -> Response {
    response.extensions_mut().insert(UpgradeResult(result));
    response
}

/// The instance serves: startup completed and it is not draining. Otherwise the
/// request is answered 503 with `Retry-After` ([`not_serving`]).
pub(crate) struct Serving(Arc<CriticalServices>);

impl FromRequestParts<Arc<ServiceInstance>> for Serving {
    type Rejection = Response;

    async fn from_request_parts(
        _parts: &mut Parts,
        instance: &Arc<ServiceInstance>,
    ) -> Result<Serving, Response> {
        match instance.serving() {
            Some(services) => Ok(Serving(services.clone())),
            None => Err(not_serving(instance)),
        }
    }
}

/// The request comes from an allowed origin and carries a valid token (header or
/// subprotocol); otherwise it is answered 403 or 401, as [`auth::AuthError`] says.
pub(crate) struct Authenticated {
    user: UserId,
    /// When the token's access ends (`None`: never).
    expires_at: Option<SystemTime>,
    /// The subprotocol the token came in, echoed in the upgrade's answer.
    subprotocol: Option<&'static str>,
}

impl FromRequestParts<Arc<ServiceInstance>> for Authenticated {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        instance: &Arc<ServiceInstance>,
    ) -> Result<Authenticated, Response> {
        // Extracted after `Serving`; a drain that began in between answers as it would.
        let Some(services) = instance.serving() else {
            return Err(not_serving(instance));
        };
        let settings = services.bridge.settings();
        if !auth::origin_allowed(&parts.headers, &settings.allowed_origins) {
            return Err(tagged(
                auth::AuthError::OriginNotAllowed.into_response(),
                "forbidden",
            ));
        }
        let credentials = match auth::credentials(&parts.headers) {
            Ok(c) => c,
            Err(e) => return Err(tagged(e.into_response(), "unauthorized")),
        };
        match services.verifier.verify(&credentials.token) {
            Ok(auth::Verified { user, expires_at }) => Ok(Authenticated {
                user,
                expires_at,
                subprotocol: credentials.subprotocol,
            }),
            Err(e) => {
                debug!(reason = e.reason(), "upgrade refused");
                Err(tagged(e.into_response(), "unauthorized"))
            }
        }
    }
}

/// `/ws` before startup completed, or while draining: 503 + `Retry-After`, and a
/// body that says why. Never 500.
pub(crate) fn not_serving(instance: &ServiceInstance) -> Response {
    let report = instance.progress.report();
    let result = if report.state == HealthState::Draining {
        "draining"
    } else {
        "starting"
    };
    let body = match report.state {
        HealthState::Draining => serde_json::json!({
            "error": "draining",
            "message": "this instance is shutting down; reconnect to another one",
        }),
        _ => serde_json::json!({
            "error": "starting",
            "phase": report.phase,
            "message": format!(
                "startup has not completed (phase {}); retry shortly",
                report.phase.map(|p| p.as_str()).unwrap_or("starting")
            ),
        }),
    };
    let mut response = (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(RETRY_AFTER_SECONDS),
    );
    tagged(response, result)
}

/// `/ws`: the instance serves and the client is authenticated (checked in the order
/// of the arguments), then the upgrade takes a connection slot and completes.
pub(crate) async fn upgrade(
    State(instance): State<Arc<ServiceInstance>>,
    Serving(services): Serving,
    Authenticated {
        user,
        expires_at,
        subprotocol,
    }: Authenticated,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(rejection) => return tagged(rejection.into_response(), "bad_request"),
    };
    let settings = services.bridge.settings();
    let limit = settings.max_message_bytes;
    let mut upgrade = upgrade
        .read_buffer_size(READ_BUFFER_BYTES)
        // Write each frame as it is sent; the queue in front of the socket is the
        // buffer, and it is bounded.
        .write_buffer_size(0)
        .max_write_buffer_size(limit.saturating_mul(2).max(64 * 1024))
        .max_message_size(limit)
        .max_frame_size(limit);
    if let Some(protocol) = subprotocol {
        upgrade = upgrade.protocols([protocol]);
    }
    let admitted = match services.bridge.admit(&user) {
        Ok(admission) => {
            // The per-user limit holds across pods: the other replicas' sockets of
            // this user count too.
            match services
                .replicas
                .admit_connection(
                    &user,
                    &admission.connection_id,
                    settings.max_connections_per_user,
                )
                .await
            {
                Ok(Some(slot)) => Ok((admission, Some(slot))),
                Ok(None) => Err(OverLimit::PerUser),
                Err(e) => {
                    // The database is down: this pod's own limit still holds, and
                    // readiness already sends new clients elsewhere.
                    warn!(error = %e, "the per-user connection limit across pods cannot be checked; applying this pod's");
                    Ok((admission, None))
                }
            }
        }
        Err(over) => Err(over),
    };
    match admitted {
        Ok((admission, slot)) => {
            let connection = Connection {
                instance,
                services,
                user,
                expires_at,
                admission,
                _slot: slot,
                request_span: tracing::Span::current(),
            };
            tagged(
                upgrade.on_upgrade(move |socket| connection.serve(socket)),
                "accepted",
            )
        }
        Err(over) => {
            info!(user_id = %user, reason = over.reason(), "connection refused with 1013");
            tagged(
                upgrade.on_upgrade(move |socket| refuse(socket, instance, over)),
                "over_limit",
            )
        }
    }
}

/// Tells a socket over a limit to come back later, and closes it.
async fn refuse(mut socket: WebSocket, instance: Arc<ServiceInstance>, over: OverLimit) {
    close(&mut socket, close_code::AGAIN, over.reason()).await;
    instance.metrics.close(close_code::AGAIN);
}

/// Sends a close frame and waits (bounded) for the client's, so the client reads
/// the code before the TCP connection goes away.
async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) {
    // After an oversized frame the rest of it is still unread; reading on would
    // only pull in what was refused. The close frame is already on its way.
    let await_reply = code != close_code::SIZE;
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }));
    if !matches!(
        tokio::time::timeout(CLOSE_TIMEOUT, socket.send(frame)).await,
        Ok(Ok(()))
    ) {
        return;
    }
    if !await_reply {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while let Some(Ok(message)) = socket.recv().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// An admitted socket and everything it serves with.
struct Connection {
    instance: Arc<ServiceInstance>,
    services: Arc<CriticalServices>,
    user: UserId,
    /// When the token's access ends; the socket closes then (`None`: never).
    expires_at: Option<SystemTime>,
    admission: Admission,
    /// The user's connection slot across pods; freed when the socket ends.
    _slot: Option<ConnectionSlot>,
    /// The upgrade request's span (its trace, on Cloud Run): the socket outlives the
    /// request handler, and its lines keep the request's trace.
    request_span: tracing::Span,
}

/// How a socket's loop ended, for the close code and the log.
enum Ending {
    /// The client closed (its code, or 1005/1006).
    ByClient(u16),
    /// The service closes with this code.
    ByServer(u16, &'static str),
    /// The client stopped reading; no close frame can reach it.
    SlowReader,
}

impl Connection {
    async fn serve(self, socket: WebSocket) {
        let span = info_span!(
            parent: &self.request_span,
            "ws",
            connection_id = %self.admission.connection_id,
            user_id = %self.user
        );
        self.run(socket).instrument(span).await;
    }

    async fn run(self, mut socket: WebSocket) {
        let metrics = &self.instance.metrics;
        metrics.active_connections.inc();
        debug!("connected");
        let ending = self.chat(&mut socket).await;
        let code = match ending {
            Ending::ByClient(code) => code,
            Ending::ByServer(code, reason) => {
                close(&mut socket, code, reason).await;
                code
            }
            Ending::SlowReader => close_code::AGAIN,
        };
        match ending {
            Ending::ByClient(_) => debug!(code, "closed by client"),
            Ending::ByServer(_, reason) => debug!(code, reason, "closed by service"),
            Ending::SlowReader => info!("disconnected: the client stopped reading"),
        }
        metrics.close(code);
        metrics.active_connections.dec();
    }

    /// The protocol loop. Returns how the socket should end; never closes it.
    async fn chat(&self, socket: &mut WebSocket) -> Ending {
        let settings = self.services.bridge.settings();
        let hello = ServerEvent::connected(&*self.user, &self.admission.connection_id);
        if send(socket, &hello, settings.send_timeout).await.is_err() {
            return Ending::SlowReader;
        }
        let mut lane: Option<ChatLane> = None;
        // Events of this user's runs started by other sockets, here or on other pods.
        let others = self.services.replicas.subscribe(
            &self.user,
            &self.admission.connection_id,
            settings.send_queue,
        );
        let tick_every = settings.keepalive.min(settings.idle_timeout);
        let tick = tokio::time::sleep(tick_every);
        tokio::pin!(tick);
        let mut restarting = self.services.bridge.restarting();
        let token_left = self.expires_at.map_or(MAX_TOKEN_WAIT, |at| {
            at.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
                .min(MAX_TOKEN_WAIT)
        });
        let token_expiry = tokio::time::sleep(token_left);
        tokio::pin!(token_expiry);
        // Frames mark the socket as heard from; the clock is read only on ticks, not
        // on every frame.
        let mut heard = false;
        let mut idle_since = Instant::now();

        loop {
            tokio::select! {
                biased;
                _ = &mut restarting => {
                    // Runs were stopped before the restart was announced; what they
                    // queued last (`error shutting_down`) still reaches the client,
                    // so it knows to resend after reconnecting.
                    while let Some(event) = lane.as_mut().and_then(ChatLane::try_next) {
                        if self.deliver(socket, &event).await.is_err() {
                            return Ending::SlowReader;
                        }
                    }
                    return Ending::ByServer(close_code::RESTART, "service restart");
                }
                _ = &mut token_expiry, if self.expires_at.is_some() => {
                    // Access ends with the token: the client is told why, then the
                    // socket closes with 1008 (policy violation), as RFC 6455 has it.
                    let notice = ServerEvent::error(
                        ErrorCode::TokenExpired,
                        "your token expired; reconnect with a fresh token",
                    );
                    if self.deliver(socket, &notice).await.is_err() {
                        return Ending::SlowReader;
                    }
                    info!("token expired; closing with 1008");
                    return Ending::ByServer(close_code::POLICY, "token expired");
                }
                incoming = socket.recv() => {
                    let message = match incoming {
                        Some(Ok(m)) => m,
                        Some(Err(e)) => return ending_for_error(e),
                        None => return Ending::ByClient(close_code::ABNORMAL),
                    };
                    heard = true;
                    let reply = match message {
                        Message::Text(text) => self.on_text(text.as_str(), &mut lane),
                        Message::Binary(_) => Some(ServerEvent::error(
                            ErrorCode::UnsupportedFrame,
                            "binary frames are not part of the protocol; send JSON text frames",
                        )),
                        // tungstenite answers pings itself; both count as signs of life.
                        Message::Ping(_) | Message::Pong(_) => None,
                        Message::Close(frame) => {
                            return Ending::ByClient(
                                frame.map(|f| f.code).unwrap_or(close_code::STATUS),
                            );
                        }
                    };
                    if let Some(reply) = reply
                        && self.deliver(socket, &reply).await.is_err()
                    {
                        return Ending::SlowReader;
                    }
                }
                delivery = others.next() => match delivery {
                    Delivery::Event(event) => {
                        if self.deliver(socket, &event).await.is_err() {
                            return Ending::SlowReader;
                        }
                    }
                    Delivery::Overflow => return Ending::SlowReader,
                },
                next = next_from(&mut lane) => match next {
                    LaneEvent::Event(event) => {
                        if self.deliver(socket, &event).await.is_err() {
                            return Ending::SlowReader;
                        }
                    }
                    LaneEvent::Overflow => return Ending::SlowReader,
                },
                _ = &mut tick => {
                    let now = Instant::now();
                    if std::mem::take(&mut heard) {
                        idle_since = now;
                    } else if now.duration_since(idle_since) >= settings.idle_timeout {
                        return Ending::ByServer(close_code::NORMAL, "idle timeout");
                    }
                    // A ping makes live clients answer (resetting the idle clock)
                    // and keeps proxies from cutting a quiet socket.
                    let ping = socket.send(Message::Ping(Default::default()));
                    if !matches!(tokio::time::timeout(settings.send_timeout, ping).await, Ok(Ok(()))) {
                        return Ending::SlowReader;
                    }
                    tick.as_mut().reset(now + tick_every);
                }
            }
        }
    }

    /// Handles one text frame; returns the frame to answer with directly, if any.
    fn on_text(&self, text: &str, lane: &mut Option<ChatLane>) -> Option<ServerEvent> {
        match protocol::parse_client_frame(text) {
            Ok(ClientRequest::Ping) => Some(ServerEvent::pong_now()),
            Ok(request) => {
                let lane = lane.get_or_insert_with(|| {
                    ChatLane::open(
                        self.services.supervisor.clone(),
                        self.user.clone(),
                        self.admission.connection_id.as_str().into(),
                        self.services.bridge.settings().send_queue,
                    )
                });
                self.instance.metrics.agent_requests.inc();
                match lane.submit(request) {
                    Submitted::Queued => None,
                    Submitted::Busy => Some(ServerEvent::error(
                        ErrorCode::RateLimited,
                        "too many requests waiting on this connection; wait for their answers before sending more",
                    )),
                }
            }
            Err(e) => Some(e.into_event()),
        }
    }

    /// Counts an event and sends it; an error means the client stopped reading.
    async fn deliver(&self, socket: &mut WebSocket, event: &ServerEvent) -> Result<(), ()> {
        self.count(event);
        send(socket, event, self.services.bridge.settings().send_timeout).await
    }

    fn count(&self, event: &ServerEvent) {
        let metrics = &self.instance.metrics;
        match event {
            ServerEvent::AgentStarted { .. } | ServerEvent::AgentCompleted { .. } => {
                metrics.agent_event(event.kind());
            }
            ServerEvent::Error { code, .. } => metrics.error_sent(code.as_str()),
            _ => {}
        }
    }
}

/// The next event of the socket's chat lane; never resolves without a lane.
async fn next_from(lane: &mut Option<ChatLane>) -> LaneEvent {
    match lane {
        Some(lane) => lane.next().await,
        None => std::future::pending().await,
    }
}

/// Sends one frame; an error means the socket is unusable (or the client stopped
/// reading for longer than `timeout`, `CHATGATE_SEND_TIMEOUT_SECONDS`).
async fn send(socket: &mut WebSocket, event: &ServerEvent, timeout: Duration) -> Result<(), ()> {
    // Serialising a wire type cannot fail (no maps with non-string keys).
    let text = serde_json::to_string(event).unwrap_or_default();
    let mut sending = std::pin::pin!(socket.send(Message::Text(text.into())));
    // Almost every send completes at once (the kernel buffer has room); only a
    // send that has to wait gets a timer.
    if let std::task::Poll::Ready(result) = futures::poll!(sending.as_mut()) {
        return result.map_err(|_| ());
    }
    match tokio::time::timeout(timeout, sending).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// Maps a read error to the close the protocol requires.
fn ending_for_error(error: axum::Error) -> Ending {
    use tungstenite::error::{CapacityError, Error as WsError};
    match error.into_inner().downcast::<WsError>() {
        Ok(e) => match *e {
            WsError::Capacity(CapacityError::MessageTooLong { .. }) => Ending::ByServer(
                close_code::SIZE,
                "message larger than CHATGATE_MAX_MESSAGE_BYTES",
            ),
            WsError::Utf8(_) => {
                Ending::ByServer(close_code::INVALID, "text frame is not valid UTF-8")
            }
            WsError::Protocol(_) => {
                Ending::ByServer(close_code::PROTOCOL, "WebSocket protocol violation")
            }
            WsError::ConnectionClosed | WsError::AlreadyClosed => {
                Ending::ByClient(close_code::ABNORMAL)
            }
            _ => Ending::ByClient(close_code::ABNORMAL),
        },
        Err(_) => Ending::ByClient(close_code::ABNORMAL),
    }
}
