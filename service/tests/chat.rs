//! Chat over `/ws` against the real binary and a real SQLite file: agent runs,
//! persistence across a restart, user isolation and the run rate limit.

mod common;

use common::*;
use serde_json::{Value, json};

/// Events until (and including) the run's end: `agent_completed` or an `error`.
async fn run_events(socket: &mut Socket) -> Vec<Value> {
    let mut events = Vec::new();
    for _ in 0..1000 {
        let event = next_json(socket).await;
        let done = event["type"] == "agent_completed" || event["type"] == "error";
        events.push(event);
        if done {
            return events;
        }
    }
    panic!("a run did not end within 1000 events: {events:?}");
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["type"].as_str().unwrap_or_default())
        .collect()
}

fn file_db(builder: &ServiceBuilder) -> String {
    format!("sqlite://{}", builder.dir().join("chat.db").display())
}

#[tokio::test]
async fn a_chat_round_trip_persists_the_thread_across_a_restart() {
    let builder = ServiceBuilder::new();
    let db = file_db(&builder);
    let mut service = builder.env("CHATGATE_DATABASE_URL", &db).start().await;
    let mut socket = service.connect_as("alice").await;
    // Nested under `payload`, as the original frontend sends it.
    send_json(
        &mut socket,
        json!({"type": "user_message", "payload": {"content": "count these four words", "client_message_id": "m-1"}}),
    )
    .await;
    let events = run_events(&mut socket).await;
    let k = kinds(&events);
    assert_eq!(
        &k[..4],
        [
            "agent_started",
            "agent_thinking",
            "tool_executing",
            "tool_completed"
        ],
        "{events:?}"
    );
    assert_eq!(k.last(), Some(&"agent_completed"), "{events:?}");
    assert!(k[4..k.len() - 1].iter().all(|k| *k == "agent_response"));
    assert!(k.len() >= 6, "at least one response chunk: {k:?}");
    let started = &events[0];
    assert_eq!(started["client_message_id"], "m-1");
    let run_id = started["run_id"].as_str().expect("run_id").to_string();
    let thread_id = started["thread_id"]
        .as_str()
        .expect("thread_id")
        .to_string();
    assert!(events.iter().all(|e| e["run_id"] == run_id.as_str()));
    let reply: String = events
        .iter()
        .filter(|e| e["type"] == "agent_response")
        .map(|e| e["delta"].as_str().unwrap_or_default())
        .collect();

    send_json(&mut socket, json!({"type": "list_threads"})).await;
    let threads = next_json(&mut socket).await;
    assert_eq!(threads["type"], "threads");
    assert_eq!(threads["threads"][0]["thread_id"], thread_id.as_str());

    // The reply is counted as an agent run in the metrics.
    let (_, metrics, _) = service.get("/metrics").await.expect("metrics");
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    assert!(
        metrics.contains("chatgate_agent_events_total{event=\"agent_completed\"} 1"),
        "{metrics}"
    );

    drop(socket);
    service.signal("TERM");
    assert_eq!(service.exit_status().await.code(), Some(0));

    // Same database file, new process.
    let service = ServiceBuilder::new()
        .env("CHATGATE_DATABASE_URL", &db)
        .start()
        .await;
    let mut socket = service.connect_as("alice").await;
    send_json(
        &mut socket,
        json!({"type": "get_thread", "thread_id": thread_id}),
    )
    .await;
    let thread = next_json(&mut socket).await;
    assert_eq!(thread["type"], "thread", "{thread}");
    let messages = thread["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 2, "{thread}");
    assert_eq!(messages[0]["role"], "user");
    assert_eq!(messages[0]["content"], "count these four words");
    assert_eq!(messages[1]["content"], reply.as_str());
}

#[tokio::test]
async fn a_user_never_reads_another_users_thread() {
    let builder = ServiceBuilder::new();
    let db = file_db(&builder);
    let service = builder.env("CHATGATE_DATABASE_URL", &db).start().await;
    let mut alice = service.connect_as("alice").await;
    send_json(
        &mut alice,
        json!({"type": "user_message", "content": "secret plans"}),
    )
    .await;
    let events = run_events(&mut alice).await;
    let thread_id = events[0]["thread_id"].as_str().expect("thread").to_string();

    let mut bob = service.connect_as("bob").await;
    send_json(
        &mut bob,
        json!({"type": "get_thread", "thread_id": thread_id}),
    )
    .await;
    let answer = next_json(&mut bob).await;
    assert_eq!(answer["type"], "error");
    assert_eq!(answer["code"], "not_found");
    assert_eq!(answer["thread_id"], thread_id.as_str());
    // Exactly what a thread that never existed answers.
    send_json(
        &mut bob,
        json!({"type": "get_thread", "thread_id": "no-such-thread"}),
    )
    .await;
    let missing = next_json(&mut bob).await;
    assert_eq!(missing["code"], "not_found");

    // Writing into it is refused the same way.
    send_json(
        &mut bob,
        json!({"type": "user_message", "content": "hijack", "thread_id": thread_id}),
    )
    .await;
    let answer = next_json(&mut bob).await;
    assert_eq!(
        (answer["type"].as_str(), answer["code"].as_str()),
        (Some("error"), Some("not_found"))
    );

    send_json(&mut bob, json!({"type": "list_threads"})).await;
    let threads = next_json(&mut bob).await;
    assert_eq!(threads["threads"], json!([]));
}

#[tokio::test]
async fn agent_runs_are_rate_limited_per_user_but_pings_are_not() {
    let service = ServiceBuilder::new()
        .env("CHATGATE_RUNS_PER_MINUTE", "1")
        .start()
        .await;
    let mut socket = service.connect_as("rex").await;
    send_json(
        &mut socket,
        json!({"type": "user_message", "content": "one"}),
    )
    .await;
    let first = run_events(&mut socket).await;
    assert_eq!(first.last().expect("events")["type"], "agent_completed");
    send_json(
        &mut socket,
        json!({"type": "user_message", "content": "two"}),
    )
    .await;
    let second = next_json(&mut socket).await;
    assert_eq!(
        (second["type"].as_str(), second["code"].as_str()),
        (Some("error"), Some("rate_limited"))
    );
    for _ in 0..20 {
        send_json(&mut socket, json!({"type": "ping"})).await;
        assert_eq!(next_json(&mut socket).await["type"], "pong");
    }
    // Another user has a budget of their own.
    let mut other = service.connect_as("rhea").await;
    send_json(
        &mut other,
        json!({"type": "user_message", "content": "mine"}),
    )
    .await;
    assert_eq!(
        run_events(&mut other).await.last().expect("events")["type"],
        "agent_completed"
    );
}

#[tokio::test]
async fn cancelling_an_unknown_run_answers_not_found() {
    let service = ServiceBuilder::new().start().await;
    let mut socket = service.connect_as("carl").await;
    send_json(&mut socket, json!({"type": "cancel", "run_id": "nope"})).await;
    let answer = next_json(&mut socket).await;
    assert_eq!(answer["code"], "not_found");
    assert_eq!(answer["run_id"], "nope");
}
