//! The service on Cloud Run as it is, against the real binary: it serves on `$PORT`
//! when `CHATGATE_LISTEN` is unset, and its JSON lines carry what Cloud Logging reads
//! (`severity`, `message`, the request's trace, `K_SERVICE`/`K_REVISION`).

mod common;

use common::*;
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[tokio::test]
async fn port_is_where_it_listens_when_chatgate_listen_is_unset() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_chatgate-service"))
        .arg("--print-config")
        .env_remove("CHATGATE_LISTEN")
        .env("PORT", "9321")
        .output()
        .await
        .expect("run chatgate-service --print-config");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.lines().any(|l| l == "CHATGATE_LISTEN=0.0.0.0:9321"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_chatgate-service"))
        .env_remove("CHATGATE_LISTEN")
        .env("PORT", "eighty")
        .output()
        .await
        .expect("run chatgate-service");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("PORT `eighty` is not a port number"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

async fn socket_with_trace(service: &Service, header: &str) {
    let mut request = service.ws_url().into_client_request().expect("request");
    request.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", token("ada"))).expect("header"),
    );
    request.headers_mut().insert(
        "x-cloud-trace-context",
        HeaderValue::from_str(header).expect("header"),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("connect");
    assert_eq!(next_json(&mut socket).await["type"], "connected");
    let _ = socket.close(None).await;
}

async fn logs_of_one_traced_socket(project: Option<&str>) -> Vec<Value> {
    let mut builder = ServiceBuilder::new()
        .env("RUST_LOG", "info,chatgate_service=debug")
        .env("K_SERVICE", "chat")
        .env("K_REVISION", "chat-00007-abc");
    if let Some(p) = project {
        builder = builder.env("GOOGLE_CLOUD_PROJECT", p);
    }
    let service = builder.start().await;
    socket_with_trace(&service, &format!("{TRACE}/12345;o=1")).await;
    let lines = eventually("the socket's lines are logged", || async {
        let lines = json_lines(&service.stderr());
        lines
            .iter()
            .any(|l| l["message"] == "closed by client")
            .then_some(lines)
    })
    .await
    .expect("a `closed by client` line");
    service.signal("TERM");
    lines
}

#[tokio::test]
async fn every_json_line_has_severity_message_and_the_revision() {
    let lines = logs_of_one_traced_socket(None).await;
    assert!(lines.len() >= 3, "{lines:?}");
    for line in &lines {
        assert!(line["severity"].is_string(), "{line}");
        assert!(line["message"].is_string(), "{line}");
        assert_eq!(line["serviceContext"]["service"], "chat", "{line}");
        assert_eq!(
            line["serviceContext"]["version"], "chat-00007-abc",
            "{line}"
        );
    }
    let started = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("startup complete"))
        })
        .expect("a startup line");
    assert_eq!(started["severity"], "INFO");
    // A line outside any request has no trace.
    assert!(started.get("logging.googleapis.com/trace").is_none());
}

#[tokio::test]
async fn a_sockets_lines_carry_its_trace_as_a_resource_name_with_the_project() {
    let lines = logs_of_one_traced_socket(Some("acme-prod")).await;
    for message in ["connected", "closed by client"] {
        let line = lines
            .iter()
            .find(|l| l["message"] == message)
            .unwrap_or_else(|| panic!("no `{message}` line in {lines:?}"));
        assert_eq!(
            line["logging.googleapis.com/trace"],
            format!("projects/acme-prod/traces/{TRACE}"),
            "{line}"
        );
        assert_eq!(line["logging.googleapis.com/spanId"], "0000000000003039");
        assert_eq!(line["logging.googleapis.com/trace_sampled"], true);
        assert!(line.get("trace_id").is_none(), "{line}");
    }
}

#[tokio::test]
async fn without_a_project_the_trace_is_the_raw_trace_id() {
    let lines = logs_of_one_traced_socket(None).await;
    let line = lines
        .iter()
        .find(|l| l["message"] == "connected")
        .expect("a `connected` line");
    assert_eq!(line["logging.googleapis.com/trace"], TRACE, "{line}");
}
