//! The agent supervisor: the event sequence of a run and what the store holds when
//! each event arrives, rate limits, cancel, retries with a client_message_id,
//! provider failures, slow clients, shutdown; and the wire types (frame parsing,
//! exact event JSON).

mod openai_fixture;

use std::time::Duration;

use chatgate_service::agent::{AgentSupervisor, DeliveryError, TOOL_NAME};
use chatgate_service::config::RunLimits;
use chatgate_service::llm::LlmClient;
use chatgate_service::protocol::{ClientRequest, ErrorCode, ServerEvent, parse_client_frame};
use chatgate_service::store::{Role, ThreadStore};
use openai_fixture::{Fixture, Scenario};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// Long enough for anything a run does on loopback; only reached when a test fails.
const PATIENCE: Duration = Duration::from_secs(20);

struct Harness {
    supervisor: AgentSupervisor,
    store: ThreadStore,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn new(llm: LlmClient, runs_per_minute: u32) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("chat.db").display());
        let store = ThreadStore::connect(&url).await.unwrap();
        Harness {
            supervisor: AgentSupervisor::new(store.clone(), llm, runs_per_minute),
            store,
            _dir: dir,
        }
    }

    async fn builtin() -> Harness {
        Harness::new(LlmClient::builtin(), 100).await
    }

    async fn openai(fixture: &Fixture) -> Harness {
        let llm =
            LlmClient::from_config("openai", Some("k".into()), &fixture.base_url, "m").unwrap();
        Harness::new(llm, 100).await
    }
}

struct Client {
    user: String,
    tx: mpsc::Sender<ServerEvent>,
    rx: mpsc::Receiver<ServerEvent>,
}

impl Client {
    fn new(user: &str) -> Client {
        let (tx, rx) = mpsc::channel(64);
        Client {
            user: user.to_owned(),
            tx,
            rx,
        }
    }

    async fn send(&self, h: &Harness, request: ClientRequest) {
        h.supervisor
            .handle(&self.user, request, self.tx.clone())
            .await
            .expect("the queue has room");
    }

    async fn say(&self, h: &Harness, content: &str, thread_id: Option<&str>, cmid: Option<&str>) {
        self.send(
            h,
            ClientRequest::UserMessage {
                content: content.to_owned(),
                thread_id: thread_id.map(str::to_owned),
                client_message_id: cmid.map(str::to_owned),
            },
        )
        .await;
    }

    async fn next(&mut self) -> ServerEvent {
        tokio::time::timeout(PATIENCE, self.rx.recv())
            .await
            .expect("an event within the patience window")
            .expect("the queue stays open")
    }

    /// Events up to and including the end of a run (`agent_completed` or `error`).
    async fn until_run_ends(&mut self) -> Vec<ServerEvent> {
        let mut events = Vec::new();
        loop {
            let event = self.next().await;
            let last = matches!(
                event,
                ServerEvent::AgentCompleted { .. } | ServerEvent::Error { .. }
            );
            events.push(event);
            if last {
                return events;
            }
        }
    }
}

fn kinds(events: &[ServerEvent]) -> Vec<&'static str> {
    events.iter().map(ServerEvent::kind).collect()
}

fn error_code(event: &ServerEvent) -> ErrorCode {
    match event {
        ServerEvent::Error { code, .. } => *code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_run_emits_every_event_in_order_and_stores_both_messages() {
    let h = Harness::builtin().await;
    let mut alice = Client::new("alice");
    alice.say(&h, "what is in a name", None, Some("c-1")).await;

    let started = alice.next().await;
    let ServerEvent::AgentStarted {
        run_id,
        thread_id,
        client_message_id,
        replay,
    } = started
    else {
        panic!("first event is agent_started, got {started:?}");
    };
    assert_eq!(client_message_id.as_deref(), Some("c-1"), "echoed");
    assert!(!replay);
    // agent_started arrives only after the user's message is stored. (The builtin
    // is fast: the reply may be stored by now too, but never before the message.)
    let stored = h.store.get_thread("alice", &thread_id).await.unwrap();
    assert!(!stored.is_empty());
    assert_eq!(
        (stored[0].role, stored[0].content.as_str()),
        (Role::User, "what is in a name")
    );

    let rest = alice.until_run_ends().await;
    let k = kinds(&rest);
    assert_eq!(
        &k[..3],
        &["agent_thinking", "tool_executing", "tool_completed"],
        "{k:?}"
    );
    let responses = k.iter().filter(|k| **k == "agent_response").count();
    assert!(responses >= 2, "the reply streams in several chunks: {k:?}");
    assert!(
        k[3..3 + responses].iter().all(|k| *k == "agent_response"),
        "{k:?}"
    );
    assert_eq!(k.last(), Some(&"agent_completed"));
    assert_eq!(k.len(), 3 + responses + 1);

    for event in &rest {
        let value = serde_json::to_value(event).unwrap();
        assert_eq!(
            value["run_id"],
            run_id.as_str(),
            "every event names the run: {value}"
        );
    }
    match (&rest[1], &rest[2]) {
        (
            ServerEvent::ToolExecuting { tool, .. },
            ServerEvent::ToolCompleted {
                tool: done, result, ..
            },
        ) => {
            assert_eq!(tool, TOOL_NAME);
            assert_eq!(done, TOOL_NAME);
            assert_eq!(result, "5 words, 17 characters");
        }
        other => panic!("tool events expected, got {other:?}"),
    }
    let reply: String = rest
        .iter()
        .filter_map(|e| match e {
            ServerEvent::AgentResponse { delta, .. } => Some(delta.as_str()),
            _ => None,
        })
        .collect();

    // agent_completed arrives only after the reply is stored.
    let ServerEvent::AgentCompleted {
        thread_id: completed_thread,
        message_id,
        ..
    } = rest.last().unwrap().clone()
    else {
        unreachable!()
    };
    assert_eq!(completed_thread, thread_id);
    let stored = h.store.get_thread("alice", &thread_id).await.unwrap();
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[1].message_id, message_id);
    assert_eq!(stored[1].role, Role::Assistant);
    assert_eq!(stored[1].content, reply);
    assert!(reply.contains("what is in a name"));
}

#[tokio::test]
async fn a_follow_up_goes_into_the_same_thread_with_history() {
    let fixture = Fixture::start(Scenario::Echo).await;
    let h = Harness::openai(&fixture).await;
    let mut alice = Client::new("alice");
    alice.say(&h, "first question", None, None).await;
    let events = alice.until_run_ends().await;
    let ServerEvent::AgentStarted { thread_id, .. } = &events[0] else {
        panic!("{events:?}")
    };
    assert_eq!(events.last().unwrap().kind(), "agent_completed");
    alice
        .say(&h, "second question", Some(thread_id), None)
        .await;
    let events = alice.until_run_ends().await;
    assert_eq!(
        events.last().unwrap().kind(),
        "agent_completed",
        "{events:?}"
    );

    let stored = h.store.get_thread("alice", thread_id).await.unwrap();
    let contents: Vec<_> = stored.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(
        contents,
        vec![
            "first question",
            "first question",
            "second question",
            "second question"
        ]
    );
    // The provider saw the earlier turns.
    let second = &fixture.requests()[1].body["messages"];
    let users: Vec<_> = second
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] != "system")
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(users, contents[..3]);
}

#[tokio::test]
async fn threads_and_messages_are_readable_only_by_their_owner() {
    let h = Harness::builtin().await;
    let mut alice = Client::new("alice");
    let mut bob = Client::new("bob");
    alice.say(&h, "mine", None, None).await;
    let events = alice.until_run_ends().await;
    let ServerEvent::AgentStarted { thread_id, .. } = events[0].clone() else {
        panic!()
    };

    alice
        .send(
            &h,
            ClientRequest::ListThreads {
                limit: None,
                cursor: None,
            },
        )
        .await;
    match alice.next().await {
        ServerEvent::Threads { threads, .. } => {
            assert_eq!(threads.len(), 1);
            assert_eq!(threads[0].thread_id, thread_id);
        }
        other => panic!("{other:?}"),
    }
    alice
        .send(
            &h,
            ClientRequest::GetThread {
                thread_id: thread_id.clone(),
                limit: None,
                cursor: None,
            },
        )
        .await;
    match alice.next().await {
        ServerEvent::Thread {
            thread_id: id,
            messages,
            next_cursor: None,
        } => {
            assert_eq!(id, thread_id);
            assert_eq!(messages.len(), 2);
        }
        other => panic!("{other:?}"),
    }

    bob.send(
        &h,
        ClientRequest::ListThreads {
            limit: None,
            cursor: None,
        },
    )
    .await;
    assert_eq!(
        bob.next().await,
        ServerEvent::Threads {
            threads: vec![],
            next_cursor: None
        }
    );
    bob.send(
        &h,
        ClientRequest::GetThread {
            thread_id: thread_id.clone(),
            limit: None,
            cursor: None,
        },
    )
    .await;
    let answer = bob.next().await;
    assert_eq!(error_code(&answer), ErrorCode::NotFound);
    // Bob cannot write into it either, and learns nothing more than for a missing id.
    bob.say(&h, "let me in", Some(&thread_id), None).await;
    let write = bob.next().await;
    assert_eq!(error_code(&write), ErrorCode::NotFound);
    bob.send(
        &h,
        ClientRequest::GetThread {
            thread_id: "no-such-thread".into(),
            limit: None,
            cursor: None,
        },
    )
    .await;
    let missing = bob.next().await;
    let strip = |e: &ServerEvent, id: &str| serde_json::to_string(e).unwrap().replace(id, "<id>");
    assert_eq!(
        strip(&answer, &thread_id),
        strip(&missing, "no-such-thread")
    );
    assert_eq!(
        h.store.get_thread("alice", &thread_id).await.unwrap().len(),
        2
    );
}

#[tokio::test]
async fn runs_over_the_per_user_limit_are_refused_but_pings_are_not() {
    let h = Harness::new(LlmClient::builtin(), 2).await;
    let mut alice = Client::new("alice");
    for i in 0..2 {
        alice.say(&h, &format!("message {i}"), None, None).await;
        let events = alice.until_run_ends().await;
        assert_eq!(events.last().unwrap().kind(), "agent_completed");
    }
    alice.say(&h, "one too many", None, None).await;
    let refused = alice.next().await;
    assert_eq!(error_code(&refused), ErrorCode::RateLimited);
    let ServerEvent::Error { message, .. } = &refused else {
        unreachable!()
    };
    assert!(message.contains("2 agent runs per minute"), "{message}");
    // A refused message is not stored.
    assert_eq!(h.store.list_threads("alice").await.unwrap().len(), 2);

    for _ in 0..50 {
        alice.send(&h, ClientRequest::Ping).await;
        assert_eq!(alice.next().await.kind(), "pong");
    }
    // The limit is per user.
    let mut bob = Client::new("bob");
    bob.say(&h, "my first", None, None).await;
    assert_eq!(
        bob.until_run_ends().await.last().unwrap().kind(),
        "agent_completed"
    );
}

#[tokio::test]
async fn a_message_that_never_runs_does_not_use_up_the_limit() {
    let h = Harness::new(LlmClient::builtin(), 1).await;
    let mut alice = Client::new("alice");
    alice
        .say(&h, "into the void", Some("no-such-thread"), None)
        .await;
    assert_eq!(error_code(&alice.next().await), ErrorCode::NotFound);
    alice.say(&h, "a real one", None, None).await;
    let events = alice.until_run_ends().await;
    assert_eq!(
        events.last().unwrap().kind(),
        "agent_completed",
        "{events:?}"
    );
    alice.say(&h, "over the limit", None, None).await;
    assert_eq!(error_code(&alice.next().await), ErrorCode::RateLimited);
}

#[tokio::test]
async fn the_owner_can_cancel_a_run_and_others_cannot() {
    let fixture = Fixture::start(Scenario::Stall).await;
    let h = Harness::openai(&fixture).await;
    let mut alice = Client::new("alice");
    let mut bob = Client::new("bob");
    alice.say(&h, "take your time", None, None).await;
    let ServerEvent::AgentStarted {
        run_id, thread_id, ..
    } = alice.next().await
    else {
        panic!()
    };
    // Wait until the run is streaming, so the cancel hits a run in progress.
    loop {
        if alice.next().await.kind() == "agent_response" {
            break;
        }
    }

    bob.send(
        &h,
        ClientRequest::Cancel {
            run_id: run_id.clone(),
        },
    )
    .await;
    let refused = bob.next().await;
    assert_eq!(error_code(&refused), ErrorCode::NotFound);
    assert_eq!(h.supervisor.active_runs(), 1, "bob's cancel did nothing");

    alice
        .send(
            &h,
            ClientRequest::Cancel {
                run_id: run_id.clone(),
            },
        )
        .await;
    let end = alice.next().await;
    match &end {
        ServerEvent::Error {
            code: ErrorCode::Cancelled,
            run_id: Some(id),
            thread_id: Some(t),
            ..
        } => {
            assert_eq!(id, &run_id);
            assert_eq!(t, &thread_id);
        }
        other => panic!("expected error cancelled, got {other:?}"),
    }
    tokio::time::timeout(PATIENCE, h.supervisor.wait_idle())
        .await
        .unwrap();
    // The user's message stays; no partial reply is stored.
    let stored = h.store.get_thread("alice", &thread_id).await.unwrap();
    assert_eq!(stored.len(), 1);

    // A finished run cannot be cancelled.
    alice.send(&h, ClientRequest::Cancel { run_id }).await;
    assert_eq!(error_code(&alice.next().await), ErrorCode::NotFound);
}

#[tokio::test]
async fn a_retry_after_the_reply_is_replayed_from_the_store_without_running() {
    let fixture = Fixture::start(Scenario::Echo).await;
    let h = Harness::openai(&fixture).await;
    let mut alice = Client::new("alice");
    alice.say(&h, "only once", None, Some("c-7")).await;
    let first = alice.until_run_ends().await;
    let ServerEvent::AgentStarted {
        run_id, thread_id, ..
    } = first[0].clone()
    else {
        panic!()
    };
    let ServerEvent::AgentCompleted { message_id, .. } = first.last().unwrap().clone() else {
        panic!("{first:?}")
    };

    alice.say(&h, "only once", None, Some("c-7")).await;
    let replay = vec![alice.next().await, alice.next().await];
    assert_eq!(
        replay,
        vec![
            ServerEvent::AgentStarted {
                run_id: run_id.clone(),
                thread_id: thread_id.clone(),
                client_message_id: Some("c-7".into()),
                replay: true,
            },
            ServerEvent::AgentCompleted {
                run_id,
                thread_id: thread_id.clone(),
                message_id,
                replay: true,
            },
        ]
    );
    assert_eq!(fixture.requests().len(), 1, "the provider was asked once");
    assert_eq!(
        h.store.get_thread("alice", &thread_id).await.unwrap().len(),
        2
    );
    assert_eq!(h.store.list_threads("alice").await.unwrap().len(), 1);
    assert!(alice.rx.try_recv().is_err(), "nothing else was sent");
}

#[tokio::test]
async fn a_retry_while_the_first_run_is_going_is_a_duplicate() {
    let fixture = Fixture::start(Scenario::Gated(vec!["done".into()])).await;
    let h = Harness::openai(&fixture).await;
    let mut alice = Client::new("alice");
    alice.say(&h, "slow one", None, Some("c-8")).await;
    let ServerEvent::AgentStarted {
        run_id, thread_id, ..
    } = alice.next().await
    else {
        panic!()
    };
    alice.say(&h, "slow one", None, Some("c-8")).await;
    // The retry's answer may interleave with the first run's events.
    let mut duplicate = None;
    while duplicate.is_none() {
        let event = alice.next().await;
        if let ServerEvent::Error {
            code, run_id: id, ..
        } = &event
        {
            assert_eq!(*code, ErrorCode::Duplicate, "{event:?}");
            duplicate = id.clone();
        }
    }
    assert_eq!(duplicate.as_deref(), Some(run_id.as_str()));

    fixture.release();
    let rest = alice.until_run_ends().await;
    assert_eq!(rest.last().unwrap().kind(), "agent_completed", "{rest:?}");
    let stored = h.store.get_thread("alice", &thread_id).await.unwrap();
    assert_eq!(stored.len(), 2, "one message, one reply");
    assert_eq!(stored[1].content, "first done");
    assert_eq!(fixture.requests().len(), 1);
}

#[tokio::test]
async fn a_failed_provider_reports_llm_unavailable_and_keeps_the_message_for_a_retry() {
    let fixture = Fixture::start(Scenario::Echo).await;
    fixture.push(Scenario::Status(
        503,
        "upstream pool-7 overloaded; internal-trace Zx9Provider".into(),
    ));
    let h = Harness::openai(&fixture).await;
    let mut alice = Client::new("alice");
    alice.say(&h, "please answer", None, Some("c-9")).await;
    let events = alice.until_run_ends().await;
    let ServerEvent::AgentStarted {
        run_id, thread_id, ..
    } = events[0].clone()
    else {
        panic!()
    };
    match events.last().unwrap() {
        ServerEvent::Error {
            code: ErrorCode::LlmUnavailable,
            run_id: Some(id),
            message,
            ..
        } => {
            assert_eq!(id, &run_id);
            // Generic to the client: no status line, provider body, URL or error chain.
            assert_eq!(
                message,
                "the assistant is unavailable right now; your message is stored — send it again later with the same client_message_id"
            );
            for internal in ["503", "Zx9Provider", "127.0.0.1", "/v1", "chat/completions"] {
                assert!(!message.contains(internal), "{internal} in {message}");
            }
        }
        other => panic!("expected llm_unavailable, got {other:?}"),
    }
    let stored = h.store.get_thread("alice", &thread_id).await.unwrap();
    assert_eq!(stored.len(), 1, "the user's message stays stored");

    // The retry runs the stored message again; it is not stored twice.
    alice.say(&h, "please answer", None, Some("c-9")).await;
    let retry = alice.until_run_ends().await;
    let ServerEvent::AgentStarted {
        run_id: second_run,
        thread_id: same_thread,
        replay,
        ..
    } = retry[0].clone()
    else {
        panic!()
    };
    assert_ne!(second_run, run_id);
    assert_eq!(same_thread, thread_id);
    assert!(!replay);
    assert_eq!(retry.last().unwrap().kind(), "agent_completed", "{retry:?}");
    let stored = h.store.get_thread("alice", &thread_id).await.unwrap();
    let contents: Vec<_> = stored.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(contents, vec!["please answer", "please answer"]);
    assert_eq!(stored[1].role, Role::Assistant);
}

#[tokio::test]
async fn a_broken_stream_mid_reply_stores_no_partial_reply() {
    let fixture = Fixture::start(Scenario::Broken).await;
    let h = Harness::openai(&fixture).await;
    let mut alice = Client::new("alice");
    alice.say(&h, "hello", None, None).await;
    let mut events = Vec::new();
    loop {
        let event = alice.next().await;
        let streaming = event.kind() == "agent_response";
        events.push(event);
        if streaming {
            break;
        }
    }
    fixture.release();
    events.extend(alice.until_run_ends().await);
    assert_eq!(
        error_code(events.last().unwrap()),
        ErrorCode::LlmUnavailable
    );
    let ServerEvent::AgentStarted { thread_id, .. } = &events[0] else {
        panic!()
    };
    assert_eq!(
        h.store.get_thread("alice", thread_id).await.unwrap().len(),
        1
    );
}

#[tokio::test]
async fn a_store_failure_is_reported_without_its_details() {
    let h = Harness::builtin().await;
    let mut alice = Client::new("alice");
    h.store.close().await;
    alice.say(&h, "hello", None, None).await;
    let failed = alice.next().await;
    assert_eq!(error_code(&failed), ErrorCode::StorageUnavailable);
    let text = serde_json::to_string(&failed).unwrap();
    assert!(
        !text.contains("sqlite") && !text.contains("chat.db"),
        "{text}"
    );
    alice
        .send(
            &h,
            ClientRequest::ListThreads {
                limit: None,
                cursor: None,
            },
        )
        .await;
    assert_eq!(
        error_code(&alice.next().await),
        ErrorCode::StorageUnavailable
    );
    assert_eq!(h.supervisor.active_runs(), 0);
}

#[tokio::test]
async fn a_client_that_stops_reading_stops_its_run_without_blocking_anyone() {
    let fixture = Fixture::start(Scenario::Echo).await;
    let llm = LlmClient::from_config("openai", Some("k".into()), &fixture.base_url, "m").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = ThreadStore::connect(&format!("sqlite://{}", dir.path().join("c.db").display()))
        .await
        .unwrap();
    let supervisor = AgentSupervisor::new(store.clone(), llm, 100)
        .with_slow_client_grace(Duration::from_millis(50));
    // Room for agent_started only, and nobody reads.
    let (tx, mut rx) = mpsc::channel(1);
    supervisor
        .handle(
            "alice",
            ClientRequest::UserMessage {
                content: "hi".into(),
                thread_id: None,
                client_message_id: None,
            },
            tx.clone(),
        )
        .await
        .unwrap();
    tokio::time::timeout(PATIENCE, supervisor.wait_idle())
        .await
        .expect("the run gives up on the slow client");
    // A full queue is reported to the caller for direct answers.
    assert_eq!(
        supervisor.handle("alice", ClientRequest::Ping, tx).await,
        Err(DeliveryError::QueueFull)
    );
    let ServerEvent::AgentStarted { thread_id, .. } = rx.recv().await.unwrap() else {
        panic!()
    };
    assert!(rx.try_recv().is_err());
    assert_eq!(
        store.get_thread("alice", &thread_id).await.unwrap().len(),
        1
    );
}

#[tokio::test]
async fn a_closed_connection_stops_its_run_while_the_provider_stalls() {
    let fixture = Fixture::start(Scenario::Stall).await;
    let h = Harness::openai(&fixture).await;
    let mut alice = Client::new("alice");
    alice.say(&h, "hello", None, None).await;
    loop {
        if alice.next().await.kind() == "agent_response" {
            break;
        }
    }
    drop(alice);
    tokio::time::timeout(PATIENCE, h.supervisor.wait_idle())
        .await
        .unwrap();
    assert_eq!(h.supervisor.active_runs(), 0);
}

#[tokio::test]
async fn shutdown_stops_running_runs_and_refuses_new_ones() {
    let fixture = Fixture::start(Scenario::Stall).await;
    let h = Harness::openai(&fixture).await;
    let mut alice = Client::new("alice");
    alice.say(&h, "long task", None, Some("c-s")).await;
    loop {
        if alice.next().await.kind() == "agent_response" {
            break;
        }
    }
    h.supervisor.shutdown();
    assert!(h.supervisor.is_shutting_down());
    let end = alice.next().await;
    assert_eq!(error_code(&end), ErrorCode::ShuttingDown);
    tokio::time::timeout(PATIENCE, h.supervisor.wait_idle())
        .await
        .unwrap();

    alice.say(&h, "another", None, None).await;
    assert_eq!(error_code(&alice.next().await), ErrorCode::ShuttingDown);
    alice.send(&h, ClientRequest::Ping).await;
    assert_eq!(alice.next().await.kind(), "pong");
}

#[tokio::test]
async fn many_users_run_concurrently() {
    let h = Harness::builtin().await;
    let mut clients: Vec<Client> = (0..20).map(|i| Client::new(&format!("user-{i}"))).collect();
    for c in &clients {
        c.say(&h, "in parallel", None, None).await;
    }
    for c in &mut clients {
        let events = c.until_run_ends().await;
        assert_eq!(events.last().unwrap().kind(), "agent_completed");
        assert_eq!(h.store.list_threads(&c.user).await.unwrap().len(), 1);
    }
    tokio::time::timeout(PATIENCE, h.supervisor.wait_idle())
        .await
        .unwrap();
}

// ---- wire types ----

#[test]
fn frames_parse_flat_or_nested_under_payload() {
    let flat = parse_client_frame(
        r#"{"type":"user_message","content":"hi","thread_id":"t1","client_message_id":"c1"}"#,
    )
    .unwrap();
    let nested = parse_client_frame(
        r#"{"type":"user_message","payload":{"content":"hi","thread_id":"t1","client_message_id":"c1"}}"#,
    )
    .unwrap();
    assert_eq!(flat, nested);
    assert_eq!(
        flat,
        ClientRequest::UserMessage {
            content: "hi".into(),
            thread_id: Some("t1".into()),
            client_message_id: Some("c1".into()),
        }
    );
    assert_eq!(
        parse_client_frame(r#"{"type":"ping"}"#),
        Ok(ClientRequest::Ping)
    );
    assert_eq!(
        parse_client_frame(r#" {"type":"list_threads","payload":{}} "#),
        Ok(ClientRequest::ListThreads {
            limit: None,
            cursor: None
        })
    );
    assert_eq!(
        parse_client_frame(r#"{"type":"get_thread","payload":{"thread_id":"t"}}"#),
        Ok(ClientRequest::GetThread {
            thread_id: "t".into(),
            limit: None,
            cursor: None
        })
    );
    assert_eq!(
        parse_client_frame(r#"{"type":"cancel","run_id":"r","extra":[1,2]}"#),
        Ok(ClientRequest::Cancel { run_id: "r".into() })
    );
    assert_eq!(
        parse_client_frame(r#"{"type":"user_message","content":"a","thread_id":null}"#),
        Ok(ClientRequest::UserMessage {
            content: "a".into(),
            thread_id: None,
            client_message_id: None
        })
    );
    // Flat wins over nested.
    assert_eq!(
        parse_client_frame(r#"{"type":"cancel","run_id":"flat","payload":{"run_id":"nested"}}"#),
        Ok(ClientRequest::Cancel {
            run_id: "flat".into()
        })
    );
}

#[test]
fn bad_frames_get_stable_codes_and_messages_naming_the_problem() {
    let cases = [
        ("{nope", ErrorCode::InvalidJson, "not valid JSON"),
        ("", ErrorCode::InvalidJson, "JSON"),
        ("[1,2]", ErrorCode::InvalidJson, "object"),
        ("\"ping\"", ErrorCode::InvalidJson, "object"),
        (r#"{"type":"dance"}"#, ErrorCode::UnknownType, "dance"),
        (r#"{"type":7}"#, ErrorCode::InvalidField, "`type`"),
        (r#"{}"#, ErrorCode::InvalidField, "`type`"),
        (
            r#"{"type":"user_message"}"#,
            ErrorCode::InvalidField,
            "`content`",
        ),
        (
            r#"{"type":"user_message","content":"  "}"#,
            ErrorCode::InvalidField,
            "`content`",
        ),
        (
            r#"{"type":"user_message","content":5}"#,
            ErrorCode::InvalidField,
            "`content`",
        ),
        (
            r#"{"type":"user_message","content":"x","thread_id":3}"#,
            ErrorCode::InvalidField,
            "`thread_id`",
        ),
        (
            r#"{"type":"user_message","payload":"x"}"#,
            ErrorCode::InvalidField,
            "`payload`",
        ),
        (
            r#"{"type":"get_thread"}"#,
            ErrorCode::InvalidField,
            "`thread_id`",
        ),
        (
            r#"{"type":"cancel","run_id":""}"#,
            ErrorCode::InvalidField,
            "`run_id`",
        ),
    ];
    for (frame, code, needle) in cases {
        let error = parse_client_frame(frame).expect_err(frame);
        assert_eq!(error.code, code, "{frame}: {error}");
        assert!(error.message.contains(needle), "{frame}: {}", error.message);
    }
    let long_id = format!(r#"{{"type":"cancel","run_id":"{}"}}"#, "r".repeat(500));
    assert_eq!(
        parse_client_frame(&long_id).unwrap_err().code,
        ErrorCode::InvalidField
    );
}

fn json_of(event: &ServerEvent) -> Value {
    serde_json::to_value(event).unwrap()
}

#[test]
fn events_serialise_to_the_wire_frames() {
    assert_eq!(
        json_of(&ServerEvent::connected("u", "c")),
        json!({"type":"connected","user_id":"u","connection_id":"c","protocol":1})
    );
    let pong = json_of(&ServerEvent::pong_now());
    assert_eq!(pong["type"], "pong");
    assert!(pong["timestamp"].as_u64().unwrap() > 1_600_000_000_000);
    assert_eq!(
        json_of(&ServerEvent::AgentStarted {
            run_id: "r".into(),
            thread_id: "t".into(),
            client_message_id: None,
            replay: false
        }),
        json!({"type":"agent_started","run_id":"r","thread_id":"t"})
    );
    assert_eq!(
        json_of(&ServerEvent::AgentStarted {
            run_id: "r".into(),
            thread_id: "t".into(),
            client_message_id: Some("c".into()),
            replay: true
        }),
        json!({"type":"agent_started","run_id":"r","thread_id":"t","client_message_id":"c","replay":true})
    );
    assert_eq!(
        json_of(&ServerEvent::AgentThinking { run_id: "r".into() }),
        json!({"type":"agent_thinking","run_id":"r"})
    );
    assert_eq!(
        json_of(&ServerEvent::ToolExecuting {
            run_id: "r".into(),
            tool: "word_count".into()
        }),
        json!({"type":"tool_executing","run_id":"r","tool":"word_count"})
    );
    assert_eq!(
        json_of(&ServerEvent::ToolCompleted {
            run_id: "r".into(),
            tool: "word_count".into(),
            result: "1 word".into()
        }),
        json!({"type":"tool_completed","run_id":"r","tool":"word_count","result":"1 word"})
    );
    assert_eq!(
        json_of(&ServerEvent::AgentResponse {
            run_id: "r".into(),
            delta: "Hi".into()
        }),
        json!({"type":"agent_response","run_id":"r","delta":"Hi"})
    );
    assert_eq!(
        json_of(&ServerEvent::AgentCompleted {
            run_id: "r".into(),
            thread_id: "t".into(),
            message_id: "m".into(),
            replay: false
        }),
        json!({"type":"agent_completed","run_id":"r","thread_id":"t","message_id":"m"})
    );
    assert_eq!(
        json_of(&ServerEvent::Threads {
            threads: vec![chatgate_service::store::ThreadSummary {
                thread_id: "t".into(),
                title: "x".into(),
                updated_at: "2026-01-01T00:00:00Z".into()
            }],
            next_cursor: None
        }),
        json!({"type":"threads","threads":[{"thread_id":"t","title":"x","updated_at":"2026-01-01T00:00:00Z"}]})
    );
    assert_eq!(
        json_of(&ServerEvent::Thread {
            thread_id: "t".into(),
            messages: vec![chatgate_service::store::StoredMessage {
                message_id: "m".into(),
                role: Role::Assistant,
                content: "c".into(),
                created_at: "2026-01-01T00:00:00Z".into()
            }],
            next_cursor: None
        }),
        json!({"type":"thread","thread_id":"t","messages":[{"message_id":"m","role":"assistant","content":"c","created_at":"2026-01-01T00:00:00Z"}]})
    );
    assert_eq!(
        json_of(&ServerEvent::error(ErrorCode::RateLimited, "slow down")),
        json!({"type":"error","code":"rate_limited","message":"slow down"})
    );
    assert_eq!(
        json_of(&ServerEvent::Error {
            code: ErrorCode::LlmUnavailable,
            message: "m".into(),
            run_id: Some("r".into()),
            thread_id: Some("t".into())
        }),
        json!({"type":"error","code":"llm_unavailable","message":"m","run_id":"r","thread_id":"t"})
    );
    assert_eq!(
        parse_client_frame("{").unwrap_err().into_event().kind(),
        "error"
    );
    // Every code serialises as its documented spelling.
    for code in [
        ErrorCode::InvalidJson,
        ErrorCode::UnknownType,
        ErrorCode::InvalidField,
        ErrorCode::NotFound,
        ErrorCode::RateLimited,
        ErrorCode::UnsupportedFrame,
        ErrorCode::LlmUnavailable,
        ErrorCode::Duplicate,
        ErrorCode::Cancelled,
        ErrorCode::ShuttingDown,
        ErrorCode::StorageUnavailable,
    ] {
        assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
    }
}

proptest::proptest! {
    #[test]
    fn parsing_never_panics_on_arbitrary_text(text in ".*") {
        let _ = parse_client_frame(&text);
    }

    #[test]
    fn parsing_never_panics_on_json_shaped_text(
        kind in proptest::sample::select(vec!["ping", "user_message", "get_thread", "cancel", "list_threads", "x"]),
        key in "[a-z_]{0,12}",
        value in proptest::prop_oneof![
            proptest::strategy::Just("null".to_owned()),
            "[0-9]{1,5}",
            "\"[^\"\\\\]{0,20}\"",
            proptest::strategy::Just("{}".to_owned()),
            proptest::strategy::Just("[]".to_owned()),
        ],
        nested in proptest::bool::ANY,
    ) {
        let frame = if nested {
            format!(r#"{{"type":"{kind}","payload":{{"{key}":{value}}}}}"#)
        } else {
            format!(r#"{{"type":"{kind}","{key}":{value}}}"#)
        };
        match parse_client_frame(&frame) {
            Ok(request) => proptest::prop_assert_eq!(request.kind(), kind),
            Err(e) => proptest::prop_assert!(!e.message.is_empty()),
        }
    }
}

/// The harness with `limits` on its runs.
async fn limited(fixture: &Fixture, limits: RunLimits) -> Harness {
    let h = Harness::openai(fixture).await;
    Harness {
        supervisor: h.supervisor.with_run_limits(limits),
        ..h
    }
}

#[tokio::test]
async fn a_run_past_its_deadline_ends_with_run_timeout_and_keeps_the_message() {
    let fixture = Fixture::start(Scenario::Stall).await;
    let h = limited(
        &fixture,
        RunLimits {
            timeout: Duration::from_millis(500),
            ..RunLimits::default()
        },
    )
    .await;
    let mut alice = Client::new("alice");
    alice.say(&h, "take your time", None, Some("c-t")).await;
    let events = alice.until_run_ends().await;
    let ServerEvent::AgentStarted { thread_id, .. } = events[0].clone() else {
        panic!("{events:?}")
    };
    assert_eq!(error_code(events.last().unwrap()), ErrorCode::RunTimeout);
    let stored = h.store.get_thread("alice", &thread_id).await.unwrap();
    assert_eq!(stored.len(), 1, "the user's message stays stored, no reply");
    tokio::time::timeout(PATIENCE, h.supervisor.wait_idle())
        .await
        .unwrap();
    assert_eq!(h.supervisor.active_runs(), 0);
}

#[tokio::test]
async fn a_reply_past_its_size_cap_ends_with_reply_too_large_and_is_not_stored() {
    let fixture = Fixture::start(Scenario::Reply(vec!["x".repeat(700), "y".repeat(700)])).await;
    let h = limited(
        &fixture,
        RunLimits {
            max_reply_bytes: 1024,
            ..RunLimits::default()
        },
    )
    .await;
    let mut alice = Client::new("alice");
    alice.say(&h, "write a lot", None, None).await;
    let events = alice.until_run_ends().await;
    let ServerEvent::AgentStarted { thread_id, .. } = events[0].clone() else {
        panic!("{events:?}")
    };
    assert_eq!(error_code(events.last().unwrap()), ErrorCode::ReplyTooLarge);
    let deltas: usize = events
        .iter()
        .filter_map(|e| match e {
            ServerEvent::AgentResponse { delta, .. } => Some(delta.len()),
            _ => None,
        })
        .sum();
    assert!(deltas <= 1024, "{deltas} bytes were sent past the cap");
    let stored = h.store.get_thread("alice", &thread_id).await.unwrap();
    assert_eq!(stored.len(), 1, "the oversized reply is not stored");
}

#[tokio::test]
async fn beyond_the_concurrent_run_cap_a_message_is_refused_overloaded_and_not_stored() {
    let fixture = Fixture::start(Scenario::Stall).await;
    let h = limited(
        &fixture,
        RunLimits {
            max_concurrent: 1,
            ..RunLimits::default()
        },
    )
    .await;
    let mut alice = Client::new("alice");
    alice.say(&h, "a long one", None, None).await;
    loop {
        if alice.next().await.kind() == "agent_response" {
            break;
        }
    }
    let mut bob = Client::new("bob");
    bob.say(&h, "me too", None, Some("c-b")).await;
    assert_eq!(error_code(&bob.next().await), ErrorCode::Overloaded);
    assert!(
        h.store.list_threads("bob").await.unwrap().is_empty(),
        "a refused message is not stored"
    );
    // Pings are not runs.
    bob.send(&h, ClientRequest::Ping).await;
    assert_eq!(bob.next().await.kind(), "pong");
    h.supervisor.shutdown();
}
