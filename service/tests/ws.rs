//! `/ws` against the real binary: authentication before the upgrade, the wire
//! protocol's errors, limits, and the drain on SIGTERM.

mod common;
mod openai_fixture;

use common::*;
use futures::{SinkExt, StreamExt};
use openai_fixture::{Fixture, Scenario};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Response;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::{Bytes, Message};

/// Opens `/ws` with the given extra headers; the upgrade response or the refusal.
async fn upgrade_with(
    service: &Service,
    headers: &[(&str, &str)],
) -> Result<(Socket, Response), (u16, Value)> {
    let mut request = service.ws_url().into_client_request().expect("request");
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("header name");
        request
            .headers_mut()
            .insert(name, HeaderValue::from_str(value).expect("header value"));
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map_err(refusal)
}

fn rs256(claims: Value, kid: Option<&str>) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = kid.map(str::to_string);
    let key = std::fs::read(fixture("rsa_private.pem")).expect("fixture");
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(&key).expect("rsa key"),
    )
    .expect("sign")
}

fn es256(claims: Value, kid: Option<&str>) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = kid.map(str::to_string);
    let key = std::fs::read(fixture("ec_private.pem")).expect("fixture");
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_pem(&key).expect("ec key"),
    )
    .expect("sign")
}

fn claims(user: &str) -> Value {
    json!({"sub": user, "exp": now() + 600, "iss": ISSUER, "aud": AUDIENCE})
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test]
async fn jwt_matrix_on_hs256() {
    let service = ServiceBuilder::new().start().await;
    let t = now();
    let unsigned = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(claims("mallory").to_string().as_bytes())
    );
    let wrong_secret = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims("mallory"),
        &jsonwebtoken::EncodingKey::from_secret(b"another-secret-another-secret-xx"),
    )
    .expect("sign");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            hs256(json!({"sub":"u","exp":t - 3600,"iss":ISSUER,"aud":AUDIENCE})),
            "token_expired",
        ),
        (
            "future nbf",
            hs256(json!({"sub":"u","exp":t + 600,"nbf":t + 3600,"iss":ISSUER,"aud":AUDIENCE})),
            "token_not_yet_valid",
        ),
        (
            "wrong iss",
            hs256(json!({"sub":"u","exp":t + 600,"iss":"https://evil","aud":AUDIENCE})),
            "wrong_issuer",
        ),
        (
            "wrong aud",
            hs256(json!({"sub":"u","exp":t + 600,"iss":ISSUER,"aud":"other-app"})),
            "wrong_audience",
        ),
        (
            "no sub",
            hs256(json!({"exp":t + 600,"iss":ISSUER,"aud":AUDIENCE})),
            "missing_claim",
        ),
        ("alg none", unsigned, "token_malformed"),
        ("wrong secret", wrong_secret, "invalid_signature"),
        ("garbage", "not-a-jwt".to_string(), "token_malformed"),
    ];
    for (name, token, reason) in cases {
        let (status, body) = service
            .connect(&token)
            .await
            .map(|_| panic!("{name}: upgraded"))
            .unwrap_err()
            .pipe(refusal);
        assert_eq!(status, 401, "{name}: {body}");
        assert_eq!(body["reason"], reason, "{name}: {body}");
        assert!(body["message"].is_string(), "{name}: {body}");
    }

    let (status, body) = upgrade_with(&service, &[]).await.map(|_| ()).unwrap_err();
    assert_eq!(
        (status, body["reason"].as_str()),
        (401, Some("token_missing"))
    );

    // A token in the query string is not looked at (it would land in access logs).
    let mut request = format!("{}?token={}", service.ws_url(), token("u"))
        .into_client_request()
        .expect("request");
    request.headers_mut().remove("authorization");
    let (status, _) = refusal(
        tokio_tungstenite::connect_async(request)
            .await
            .map(|_| ())
            .unwrap_err(),
    );
    assert_eq!(status, 401);

    // And a valid one gets in, named by its subject.
    let _socket = service.connect_as("alice").await;
}

/// Small helper so refusals read left to right.
trait Pipe: Sized {
    fn pipe<T>(self, f: impl FnOnce(Self) -> T) -> T {
        f(self)
    }
}
impl<T> Pipe for T {}

#[tokio::test]
async fn subprotocol_tokens_select_the_protocol_name_never_the_token() {
    let service = ServiceBuilder::new().start().await;
    let jwt = token("browser-user");

    let bearer = format!("chatgate.v1, bearer.{jwt}");
    let (mut socket, response) = upgrade_with(&service, &[("sec-websocket-protocol", &bearer)])
        .await
        .expect("upgrade with bearer subprotocol");
    assert_eq!(response.headers()["sec-websocket-protocol"], "chatgate.v1");
    assert_eq!(next_json(&mut socket).await["user_id"], "browser-user");

    let legacy = format!("jwt-auth, jwt.{}", b64url(jwt.as_bytes()));
    let (mut socket, response) = upgrade_with(&service, &[("sec-websocket-protocol", &legacy)])
        .await
        .expect("upgrade with the original frontend's subprotocols");
    assert_eq!(response.headers()["sec-websocket-protocol"], "jwt-auth");
    assert_eq!(next_json(&mut socket).await["user_id"], "browser-user");

    let forged = format!("chatgate.v1, bearer.{}x", token("browser-user"));
    let (status, body) = upgrade_with(&service, &[("sec-websocket-protocol", &forged)])
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(
        (status, body["reason"].as_str()),
        (401, Some("invalid_signature"))
    );
}

#[tokio::test]
async fn rs256_accepts_its_key_and_refuses_hs256_signed_with_the_public_key() {
    let public = fixture("rsa_public.pem");
    let service = ServiceBuilder::new()
        .env("CHATGATE_JWT_ALGORITHM", "RS256")
        .without("CHATGATE_JWT_SECRET")
        .env("CHATGATE_JWT_PUBLIC_KEY", public.to_str().expect("utf-8"))
        .start()
        .await;
    let mut socket = service
        .connect(&rs256(claims("rita"), None))
        .await
        .expect("RS256 token accepted");
    assert_eq!(next_json(&mut socket).await["user_id"], "rita");

    // The classic confusion: HS256 with the RSA public key as the HMAC secret.
    let pem = std::fs::read(&public).expect("fixture");
    let confused = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims("mallory"),
        &jsonwebtoken::EncodingKey::from_secret(&pem),
    )
    .expect("sign");
    let (status, body) = refusal(service.connect(&confused).await.map(|_| ()).unwrap_err());
    assert_eq!(
        (status, body["reason"].as_str()),
        (401, Some("algorithm_not_allowed"))
    );
}

#[tokio::test]
async fn es256_keys_come_from_a_jwks_file_by_kid() {
    let jwks = fixture("jwks.json");
    let service = ServiceBuilder::new()
        .env("CHATGATE_JWT_ALGORITHM", "ES256")
        .without("CHATGATE_JWT_SECRET")
        .env("CHATGATE_JWT_JWKS_FILE", jwks.to_str().expect("utf-8"))
        .start()
        .await;
    let mut socket = service
        .connect(&es256(claims("erin"), Some("ec-1")))
        .await
        .expect("ES256 token accepted");
    assert_eq!(next_json(&mut socket).await["user_id"], "erin");

    let (status, body) = refusal(
        service
            .connect(&es256(claims("erin"), Some("nope")))
            .await
            .map(|_| ())
            .unwrap_err(),
    );
    assert_eq!(
        (status, body["reason"].as_str()),
        (401, Some("unknown_key"))
    );
    let (status, body) = refusal(
        service
            .connect(&rs256(claims("erin"), Some("rsa-1")))
            .await
            .map(|_| ())
            .unwrap_err(),
    );
    assert_eq!(
        (status, body["reason"].as_str()),
        (401, Some("algorithm_not_allowed"))
    );
}

#[tokio::test]
async fn an_origin_outside_the_allow_list_gets_403() {
    let service = ServiceBuilder::new()
        .env("CHATGATE_ALLOWED_ORIGINS", "https://chat.example.com")
        .start()
        .await;
    let auth = format!("Bearer {}", token("olga"));
    let (status, body) = upgrade_with(
        &service,
        &[
            ("authorization", &auth),
            ("origin", "https://evil.example.com"),
        ],
    )
    .await
    .map(|_| ())
    .unwrap_err();
    assert_eq!(
        (status, body["reason"].as_str()),
        (403, Some("origin_not_allowed"))
    );
    let (mut socket, _) = upgrade_with(
        &service,
        &[
            ("authorization", &auth),
            ("origin", "https://chat.example.com"),
        ],
    )
    .await
    .expect("allowed origin");
    assert_eq!(next_json(&mut socket).await["type"], "connected");
}

#[tokio::test]
async fn invalid_frames_get_error_events_and_the_connection_stays() {
    let service = ServiceBuilder::new().start().await;
    let mut socket = service.connect_as("ivan").await;

    socket
        .send(Message::Text("{not json".into()))
        .await
        .expect("send");
    assert_eq!(next_json(&mut socket).await["code"], "invalid_json");

    send_json(&mut socket, json!({"type": "dance"})).await;
    let error = next_json(&mut socket).await;
    assert_eq!(
        (error["type"].as_str(), error["code"].as_str()),
        (Some("error"), Some("unknown_type"))
    );

    send_json(&mut socket, json!({"type": "user_message", "content": 5})).await;
    assert_eq!(next_json(&mut socket).await["code"], "invalid_field");

    socket
        .send(Message::Binary(Bytes::from_static(b"\x00\x01")))
        .await
        .expect("send");
    assert_eq!(next_json(&mut socket).await["code"], "unsupported_frame");

    send_json(&mut socket, json!({"type": "ping"})).await;
    let pong = next_json(&mut socket).await;
    assert_eq!(pong["type"], "pong");
    assert!(
        pong["timestamp"]
            .as_u64()
            .is_some_and(|t| t > 1_600_000_000_000),
        "{pong}"
    );
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009() {
    let service = ServiceBuilder::new()
        .env("CHATGATE_MAX_MESSAGE_BYTES", "1024")
        .start()
        .await;
    let mut socket = service.connect_as("olaf").await;
    let big = json!({"type": "user_message", "content": "x".repeat(4096)}).to_string();
    socket.send(Message::Text(big.into())).await.expect("send");
    assert_eq!(close_code(&mut socket).await, 1009);
}

#[tokio::test]
async fn a_text_frame_that_is_not_utf8_closes_with_1007() {
    let service = ServiceBuilder::new().start().await;
    let mut socket = service.connect_as("ursula").await;
    let frame = Frame::message(
        Bytes::from_static(b"{\"type\":\"\xff\xfe\"}"),
        OpCode::Data(Data::Text),
        true,
    );
    socket.send(Message::Frame(frame)).await.expect("send");
    assert_eq!(close_code(&mut socket).await, 1007);
}

#[tokio::test]
async fn a_flood_of_connections_over_the_limit_gets_1013_not_a_crash() {
    const LIMIT: usize = 20;
    const ATTEMPTS: usize = 60;
    let service = ServiceBuilder::new()
        .env("CHATGATE_MAX_CONNECTIONS", &LIMIT.to_string())
        .start()
        .await;
    let service = std::sync::Arc::new(service);
    let attempts = (0..ATTEMPTS).map(|i| {
        let service = service.clone();
        tokio::spawn(async move {
            let mut socket = service
                .connect(&token(&format!("user-{i}")))
                .await
                .expect("upgrade");
            let first = tokio::time::timeout(PATIENCE, socket.next())
                .await
                .expect("a first frame in time");
            match first {
                Some(Ok(Message::Text(text))) => {
                    let v: Value = serde_json::from_str(&text).expect("json");
                    assert_eq!(v["type"], "connected");
                    (Some(socket), None)
                }
                Some(Ok(Message::Close(Some(frame)))) => (None, Some(u16::from(frame.code))),
                other => panic!("unexpected first frame {other:?}"),
            }
        })
    });
    let results = futures::future::join_all(attempts).await;
    let mut open = Vec::new();
    let mut refused = 0;
    for r in results {
        match r.expect("task") {
            (Some(socket), _) => open.push(socket),
            (None, Some(code)) => {
                assert_eq!(code, 1013);
                refused += 1;
            }
            _ => unreachable!(),
        }
    }
    assert_eq!(open.len(), LIMIT);
    assert_eq!(refused, ATTEMPTS - LIMIT);

    let (live, _, _) = service.get("/health/live").await.expect("still answering");
    assert_eq!(live, 200);
    // Freed slots are reusable.
    for mut socket in open.drain(..5) {
        socket.close(None).await.expect("close");
        while socket.next().await.is_some() {}
    }
    let service_ref = &service;
    eventually("a freed slot admits a new socket", || async move {
        let mut socket = service_ref.connect(&token("late-comer")).await.ok()?;
        match socket.next().await {
            Some(Ok(Message::Text(_))) => Some(()),
            _ => None,
        }
    })
    .await
    .expect("slot reused");
}

#[tokio::test]
async fn the_per_user_connection_limit_answers_1013() {
    let service = ServiceBuilder::new()
        .env("CHATGATE_MAX_CONNECTIONS_PER_USER", "2")
        .start()
        .await;
    let _a = service.connect_as("paula").await;
    let _b = service.connect_as("paula").await;
    let mut third = service.connect(&token("paula")).await.expect("upgrade");
    assert_eq!(close_code(&mut third).await, 1013);
    // Another user is not affected.
    let _c = service.connect_as("quentin").await;
}

#[tokio::test]
async fn quiet_sockets_get_keepalive_pings() {
    let service = ServiceBuilder::new()
        .env("CHATGATE_KEEPALIVE_SECONDS", "1")
        .start()
        .await;
    let mut socket = service.connect_as("kate").await;
    let got_ping = tokio::time::timeout(PATIENCE, async {
        while let Some(Ok(message)) = socket.next().await {
            if matches!(message, Message::Ping(_)) {
                return true;
            }
        }
        false
    })
    .await
    .expect("a ping in time");
    assert!(got_ping);
}

#[tokio::test]
async fn sigterm_turns_readiness_503_then_closes_sockets_with_1012_and_exits_0() {
    let mut service = ServiceBuilder::new()
        .env("CHATGATE_DRAIN_SECONDS", "2")
        .start()
        .await;
    let mut socket = service.connect_as("sam").await;
    service.signal("TERM");

    let (status, report, _) = eventually("readiness turns 503", || async {
        let r = service.get("/health/ready").await?;
        (r.0 == 503).then_some(r)
    })
    .await
    .expect("readiness 503");
    assert_eq!(status, 503);
    assert_eq!(report["state"], "draining");

    // New upgrades are refused while open sockets keep working through the drain.
    let (status, body) = refusal(
        service
            .connect(&token("late"))
            .await
            .map(|_| ())
            .unwrap_err(),
    );
    assert_eq!((status, body["error"].as_str()), (503, Some("draining")));
    send_json(&mut socket, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut socket).await["type"], "pong");

    assert_eq!(close_code(&mut socket).await, 1012);
    let exit = service.exit_status().await;
    assert_eq!(exit.code(), Some(0), "{}", service.stderr());
}

#[tokio::test]
async fn a_socket_that_goes_silent_is_closed_after_the_idle_timeout() {
    let service = ServiceBuilder::new()
        .env("CHATGATE_KEEPALIVE_SECONDS", "1")
        .env("CHATGATE_IDLE_TIMEOUT_SECONDS", "5")
        .start()
        .await;
    let started = std::time::Instant::now();
    let socket = service.connect_as("sid").await;
    // Not reading means not answering the keepalive pings either: from the
    // service's side the socket is silent, as a dead peer's would be. Wait for the
    // service to count the close, then read what it sent.
    metric_reaches(&service, "chatgate_ws_closes_total{code=\"1000\"} 1").await;
    assert!(started.elapsed() >= std::time::Duration::from_secs(5));
    assert_eq!(raw_close_code(socket).await, 1000);
}

/// Reads the frames the service sent to a client that stopped reading, straight
/// from TCP (a WebSocket client would try to answer the buffered pings on a socket
/// the service has already closed), and returns the close frame's code.
async fn raw_close_code(socket: Socket) -> u16 {
    use tokio::io::AsyncReadExt;
    use tokio_tungstenite::MaybeTlsStream;
    let MaybeTlsStream::Plain(mut tcp) = socket.into_inner() else {
        panic!("plain TCP expected");
    };
    let mut bytes = Vec::new();
    tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut bytes))
        .await
        .expect("the service closes the TCP connection")
        .expect("read");
    // Server frames are unmasked; pings and the close frame are short.
    let mut at = 0;
    while at + 2 <= bytes.len() {
        let opcode = bytes[at] & 0x0f;
        let len = usize::from(bytes[at + 1] & 0x7f);
        assert!(len < 126, "only short control frames expected");
        if opcode == 0x8 {
            return u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]);
        }
        at += 2 + len;
    }
    panic!("no close frame in {bytes:?}");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_and_others_are_not_affected() {
    let service = ServiceBuilder::new()
        .env("CHATGATE_SEND_TIMEOUT_SECONDS", "1")
        .start()
        .await;
    // A client with a tiny receive buffer that never reads: the service's pongs
    // pile up in the kernel until a send cannot complete.
    let tcp = tokio::net::TcpSocket::new_v4().expect("socket");
    tcp.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let addr = service.addr.parse().expect("a socket address");
    let tcp = tcp.connect(addr).await.expect("connect");
    let mut request = service.ws_url().into_client_request().expect("request");
    request.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", token("stan"))).expect("header"),
    );
    let (socket, _) = tokio_tungstenite::client_async(request, tcp)
        .await
        .expect("upgrade");
    let (mut sink, _never_read) = socket.split();
    let flood = tokio::spawn(async move {
        let ping = Message::Text(r#"{"type":"ping"}"#.into());
        // Bounded in count and time; a send that blocks means the service stopped
        // reading this socket (it is blocked on, or done with, its own send).
        for sent in 0..1_000_000u32 {
            match tokio::time::timeout(PATIENCE, sink.send(ping.clone())).await {
                Ok(Ok(())) => {}
                _ => return sent,
            }
        }
        1_000_000
    });

    metric_reaches(&service, "chatgate_ws_closes_total{code=\"1013\"} 1").await;
    flood.abort();
    assert!(
        service.stderr().contains("the client stopped reading"),
        "{}",
        service.stderr()
    );
    let (_, metrics, _) = service.get("/metrics").await.expect("metrics");
    assert!(
        metrics
            .as_str()
            .unwrap_or_default()
            .contains("chatgate_ws_active_connections 0"),
        "{metrics}"
    );
    // The service itself is fine: another user chats on.
    let mut other = service.connect_as("tina").await;
    send_json(&mut other, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut other).await["type"], "pong");
}

/// Waits until the service's `/metrics` holds `sample` (a `name{labels} value` line).
async fn metric_reaches(service: &Service, sample: &str) {
    eventually(&format!("/metrics shows {sample}"), || async {
        let (_, metrics, _) = service.get("/metrics").await?;
        metrics.as_str()?.contains(sample).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn sigterm_during_a_run_tells_the_client_shutting_down_before_1012() {
    // A model that streams one delta and then never finishes: the run is still
    // going when the drain ends.
    let model = Fixture::start(Scenario::Stall).await;
    let mut service = ServiceBuilder::new()
        .env("CHATGATE_DRAIN_SECONDS", "1")
        .env("CHATGATE_LLM_PROVIDER", "openai")
        .env("CHATGATE_LLM_BASE_URL", &model.base_url)
        .env("CHATGATE_LLM_API_KEY", "sk-test")
        .start()
        .await;
    let mut socket = service.connect_as("ursula").await;
    send_json(
        &mut socket,
        json!({"type": "user_message", "payload": {"content": "a long answer, please"}}),
    )
    .await;
    loop {
        let event = next_json(&mut socket).await;
        assert_ne!(event["type"], "error", "{event}");
        if event["type"] == "agent_response" {
            break;
        }
    }
    service.signal("TERM");
    let last = next_json(&mut socket).await;
    assert_eq!(
        (last["type"].as_str(), last["code"].as_str()),
        (Some("error"), Some("shutting_down")),
        "{last}"
    );
    assert_eq!(close_code(&mut socket).await, 1012);
    assert_eq!(
        service.exit_status().await.code(),
        Some(0),
        "{}",
        service.stderr()
    );
}

#[tokio::test]
async fn a_socket_closes_with_1008_when_its_token_expires() {
    let service = ServiceBuilder::new()
        .env("CHATGATE_JWT_LEEWAY_SECONDS", "0")
        .start()
        .await;
    let short = hs256(json!({
        "sub": "erin", "exp": now() + 3, "iss": ISSUER, "aud": AUDIENCE,
    }));
    let mut socket = service.connect(&short).await.expect("accepted while valid");
    assert_eq!(next_json(&mut socket).await["type"], "connected");
    // A socket whose token lives on is not touched.
    let mut lasting = service.connect_as("frank").await;

    send_json(&mut socket, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut socket).await["type"], "pong");
    let expired_at = std::time::Instant::now();
    let notice = next_json(&mut socket).await;
    assert_eq!(notice["type"], "error", "{notice}");
    assert_eq!(notice["code"], "token_expired", "{notice}");
    assert_eq!(close_code(&mut socket).await, 1008);
    assert!(
        expired_at.elapsed() < std::time::Duration::from_secs(5),
        "closed {:?} after the ping, the token had 3 s",
        expired_at.elapsed()
    );
    metric_reaches(&service, "chatgate_ws_closes_total{code=\"1008\"} 1").await;
    metric_reaches(
        &service,
        "chatgate_ws_errors_total{code=\"token_expired\"} 1",
    )
    .await;

    send_json(&mut lasting, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut lasting).await["type"], "pong");
}

/// Reads until the server closes the connection; false when it stays open past `within`.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: std::time::Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                // hyper may answer a slow request with 408 first.
                Ok(_) => continue,
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn connections_that_do_not_send_their_headers_in_time_are_closed() {
    use tokio::io::AsyncWriteExt;
    let service = ServiceBuilder::new()
        .env("CHATGATE_HEADER_TIMEOUT_SECONDS", "1")
        .start()
        .await;
    let started = std::time::Instant::now();
    // One sends nothing at all; one starts a request and never finishes its headers.
    let mut silent = tokio::net::TcpStream::connect(&service.addr).await.unwrap();
    let mut slow = tokio::net::TcpStream::connect(&service.addr).await.unwrap();
    slow.write_all(b"GET /ws HTTP/1.1\r\nHost: chat\r\n")
        .await
        .unwrap();
    let within = std::time::Duration::from_secs(5);
    assert!(
        closed_within(&mut silent, within).await,
        "a silent connection stayed open"
    );
    assert!(
        closed_within(&mut slow, within).await,
        "a slow request stayed open"
    );
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(900),
        "closed before the timeout: {:?}",
        started.elapsed()
    );
    // A WebSocket outlives the header timeout: only the handshake is bounded.
    let mut socket = service.connect_as("gina").await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    send_json(&mut socket, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut socket).await["type"], "pong");
}
