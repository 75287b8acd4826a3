//! Several real `chatgate-service` processes on one real PostgreSQL server, as the
//! replicas of a production ChatService run: what a user sees must not depend on
//! which pod each of their sockets reached, and a pod or the database failing must
//! not lose what the service acknowledged.

mod common;
mod openai_fixture;

use chatgate_tests::Postgres;
use common::*;
use openai_fixture::{Fixture, Scenario};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// One database for the pods of one test.
fn database(name: &str) -> (Postgres, String) {
    let pg =
        Postgres::start().unwrap_or_else(|e| panic!("a PostgreSQL server for this test: {e:#}"));
    let url = pg
        .create_database(name)
        .unwrap_or_else(|e| panic!("create database {name}: {e:#}"));
    (pg, url)
}

/// A pod on `url` with the builtin agent.
async fn pod(url: &str) -> Service {
    ServiceBuilder::new()
        .env("CHATGATE_DATABASE_URL", url)
        .start()
        .await
}

/// A pod on `url` whose agent is the scripted model at `model`.
fn pod_with_model(url: &str, model: &Fixture) -> ServiceBuilder {
    ServiceBuilder::new()
        .env("CHATGATE_DATABASE_URL", url)
        .env("CHATGATE_LLM_PROVIDER", "openai")
        .env("CHATGATE_LLM_BASE_URL", &model.base_url)
        .env("CHATGATE_LLM_API_KEY", "sk-test")
}

/// Every frame of one run, from `agent_started` to its last event.
async fn run_events(socket: &mut Socket) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        let event = next_json(socket).await;
        let last = event["type"] == "agent_completed" || event["type"] == "error";
        events.push(event);
        if last {
            return events;
        }
    }
}

/// Nothing more arrives within a short while (a duplicate would).
async fn assert_quiet(socket: &mut Socket, who: &str) {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => return,
            Ok(Some(Ok(Message::Text(text)))) => {
                panic!("{who} got an extra frame: {text}")
            }
            Ok(Some(Ok(_))) => continue,
            Ok(other) => panic!("{who}: the socket ended: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_users_sockets_on_every_pod_see_each_run_event_once_and_in_order() {
    let (_pg, url) = database("fanout");
    // Two pods starting at once on the empty database: both migrate it and come up.
    let mut a = ServiceBuilder::new()
        .env("CHATGATE_DATABASE_URL", &url)
        .spawn();
    let mut b = ServiceBuilder::new()
        .env("CHATGATE_DATABASE_URL", &url)
        .spawn();
    a.wait_started().await;
    b.wait_started().await;
    for pod in [&a, &b] {
        let (_, health, _) = pod.get("/health/startup").await.expect("startup health");
        assert!(
            health["schema_version"].as_i64().is_some_and(|v| v >= 2),
            "{health}"
        );
    }

    let mut sender = a.connect_as("alice").await;
    let mut same_pod = a.connect_as("alice").await;
    let mut other_pod = b.connect_as("alice").await;
    let mut stranger = b.connect_as("mallory").await;

    for round in 0..3 {
        send_json(
            &mut sender,
            json!({"type": "user_message", "content": format!("hello {round}"), "client_message_id": format!("c-{round}")}),
        )
        .await;
        let sent = run_events(&mut sender).await;
        let kinds: Vec<&str> = sent.iter().filter_map(|e| e["type"].as_str()).collect();
        assert_eq!(kinds.first(), Some(&"agent_started"), "{sent:?}");
        assert_eq!(kinds.last(), Some(&"agent_completed"), "{sent:?}");
        for (socket, who) in [
            (&mut same_pod, "the same pod"),
            (&mut other_pod, "the other pod"),
        ] {
            let seen = run_events(socket).await;
            assert_eq!(
                seen, sent,
                "a socket on {who} sees the run exactly as its sender"
            );
        }
        // A run seen to end is gone everywhere at once: a cancel sent the moment
        // its last event arrives is answered, here and on the other pod.
        let run_id = sent.last().map(|e| e["run_id"].clone()).unwrap_or_default();
        for (socket, who) in [
            (&mut sender, "the run's pod"),
            (&mut other_pod, "the other pod"),
        ] {
            send_json(socket, json!({"type": "cancel", "run_id": run_id})).await;
            let answer = next_json(socket).await;
            assert_eq!(answer["code"], "not_found", "{who}: {answer}");
        }
    }
    assert_quiet(&mut same_pod, "the same pod's socket").await;
    assert_quiet(&mut other_pod, "the other pod's socket").await;
    assert_quiet(&mut stranger, "another user's socket").await;

    // The same threads and idempotency from either pod.
    send_json(&mut other_pod, json!({"type": "list_threads"})).await;
    let threads = next_json(&mut other_pod).await;
    assert_eq!(
        threads["threads"].as_array().map(Vec::len),
        Some(3),
        "{threads}"
    );
    let thread_id = threads["threads"][0]["thread_id"].clone();
    send_json(
        &mut other_pod,
        json!({"type": "get_thread", "thread_id": thread_id}),
    )
    .await;
    let thread = next_json(&mut other_pod).await;
    let contents: Vec<&str> = thread["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["content"].as_str())
        .collect();
    assert_eq!(contents.len(), 2, "{thread}");
    assert_eq!(contents[0], "hello 2", "the newest thread first: {thread}");
    send_json(
        &mut other_pod,
        json!({"type": "user_message", "content": "hello 0", "client_message_id": "c-0"}),
    )
    .await;
    let replay = run_events(&mut other_pod).await;
    assert!(
        replay.iter().all(|e| e["replay"] == true) && replay.len() == 2,
        "a retry on another pod is answered from the store: {replay:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_from_another_pod_stops_the_run_where_it_runs() {
    let (_pg, url) = database("cancel");
    let model = Fixture::start(Scenario::Stall).await;
    let a = pod_with_model(&url, &model).start().await;
    let b = pod_with_model(&url, &model).start().await;
    let mut on_a = a.connect_as("carol").await;
    let mut on_b = b.connect_as("carol").await;

    send_json(
        &mut on_a,
        json!({"type": "user_message", "content": "take your time", "client_message_id": "slow-1"}),
    )
    .await;
    let run_id = loop {
        let event = next_json(&mut on_b).await;
        if event["type"] == "agent_response" {
            break event["run_id"].clone();
        }
    };
    // A retry reaching the other pod while the first run goes is not run twice.
    send_json(
        &mut on_b,
        json!({"type": "user_message", "content": "take your time", "client_message_id": "slow-1"}),
    )
    .await;
    let duplicate = next_json(&mut on_b).await;
    assert_eq!(duplicate["code"], "duplicate", "{duplicate}");
    assert_eq!(duplicate["run_id"], run_id, "{duplicate}");
    send_json(&mut on_b, json!({"type": "cancel", "run_id": run_id})).await;
    for (socket, who) in [(&mut on_a, "the sender"), (&mut on_b, "the canceller")] {
        let last = loop {
            let event = next_json(socket).await;
            if event["type"] == "error" {
                break event;
            }
        };
        assert_eq!(last["code"], "cancelled", "{who}: {last}");
        assert_eq!(last["run_id"], run_id, "{who}: {last}");
    }

    // A run that is not going anywhere is not found, from any pod.
    send_json(&mut on_b, json!({"type": "cancel", "run_id": run_id})).await;
    let again = next_json(&mut on_b).await;
    assert_eq!(again["code"], "not_found", "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_per_user_limits_hold_across_pods() {
    let (_pg, url) = database("limits");
    let builder = || {
        ServiceBuilder::new()
            .env("CHATGATE_DATABASE_URL", &url)
            .env("CHATGATE_MAX_CONNECTIONS_PER_USER", "2")
            .env("CHATGATE_RUNS_PER_MINUTE", "2")
    };
    let a = builder().start().await;
    let b = builder().start().await;

    let mut first = a.connect_as("dave").await;
    let second = b.connect_as("dave").await;
    let mut third = a.connect(&token("dave")).await.expect("upgrade");
    assert_eq!(
        close_code(&mut third).await,
        1013,
        "a third socket on either pod is over the limit"
    );
    let mut fourth = b.connect(&token("dave")).await.expect("upgrade");
    assert_eq!(close_code(&mut fourth).await, 1013);
    // Another user is not affected.
    let _erin = b.connect_as("erin").await;
    // A closed socket frees its slot for every pod.
    drop(second);
    eventually("dave's freed slot can be taken on pod a", || async {
        let mut socket = a.connect(&token("dave")).await.ok()?;
        let hello = tokio::time::timeout(Duration::from_secs(2), async {
            next_json_or_close(&mut socket).await
        })
        .await
        .ok()?;
        (hello["type"] == "connected").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // Two runs a minute in all: the third is refused whichever pod gets it.
    let mut earlier_runs = std::collections::BTreeSet::new();
    for round in 0..2 {
        send_json(
            &mut first,
            json!({"type": "user_message", "content": format!("run {round}")}),
        )
        .await;
        let events = run_events(&mut first).await;
        assert_eq!(
            events.last().unwrap()["type"],
            "agent_completed",
            "{events:?}"
        );
        earlier_runs.extend(
            events
                .iter()
                .filter_map(|e| e["run_id"].as_str().map(String::from)),
        );
    }
    let mut dave_b = eventually("a slot for dave on pod b", || async {
        let mut socket = b.connect(&token("dave")).await.ok()?;
        let hello = next_json_or_close(&mut socket).await;
        (hello["type"] == "connected").then_some(socket)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    send_json(
        &mut dave_b,
        json!({"type": "user_message", "content": "run 3"}),
    )
    .await;
    // Dave's other sockets also get his runs' events, relayed across pods; one of
    // the two runs above may still be arriving on this new socket. The answer to
    // "run 3" is the first frame that is not part of them.
    let refused = loop {
        let event = next_json(&mut dave_b).await;
        match event["run_id"].as_str() {
            Some(run) if earlier_runs.contains(run) => continue,
            _ => break event,
        }
    };
    assert_eq!(refused["code"], "rate_limited", "{refused}");
}

/// The next text frame as JSON, or `{"type":"closed"}` if the socket closes first.
async fn next_json_or_close(socket: &mut Socket) -> Value {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(PATIENCE, socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                return serde_json::from_str(&text).unwrap_or(Value::Null);
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            _ => return json!({"type": "closed"}),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pod_killed_mid_run_has_its_run_failed_by_the_pods_still_alive() {
    let (pg, url) = database("killed");
    let model = Fixture::start(Scenario::Stall).await;
    let mut a = pod_with_model(&url, &model).start().await;
    let b = pod_with_model(&url, &model).start().await;
    let mut on_b = b.connect_as("grace").await;
    let mut on_a = a.connect_as("grace").await;
    send_json(
        &mut on_a,
        json!({"type": "user_message", "content": "never finishes", "client_message_id": "k-1"}),
    )
    .await;
    let run_id = loop {
        let event = next_json(&mut on_b).await;
        if event["type"] == "agent_response" {
            break event["run_id"].clone();
        }
    };
    a.signal("KILL");
    a.exit_status().await;
    let killed_at = Instant::now();
    let failed = next_json(&mut on_b).await;
    let took = killed_at.elapsed();
    assert_eq!(failed["type"], "error", "{failed}");
    assert_eq!(failed["code"], "run_interrupted", "{failed}");
    assert_eq!(failed["run_id"], run_id, "{failed}");
    // Dead after 10 s without a heartbeat, noticed at the next 2 s heartbeat of a
    // surviving pod; the rest is margin for a loaded machine.
    assert!(took < Duration::from_secs(20), "reported after {took:?}");
    assert_eq!(pg.psql("killed", "SELECT count(*) FROM runs").unwrap(), "0");
    assert_quiet(&mut on_b, "the surviving pod's socket").await;

    // The message is stored, unanswered: a retry on the surviving pod runs it.
    model.set_default(Scenario::Reply(vec!["done".into()]));
    send_json(
        &mut on_b,
        json!({"type": "user_message", "content": "never finishes", "client_message_id": "k-1"}),
    )
    .await;
    let retried = run_events(&mut on_b).await;
    assert_eq!(
        retried.last().unwrap()["type"],
        "agent_completed",
        "{retried:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_outage_makes_the_pod_unready_not_dead_and_it_recovers() {
    let (mut pg, url) = database("outage");
    let a = pod(&url).await;
    let mut socket = a.connect_as("heidi").await;
    send_json(
        &mut socket,
        json!({"type": "user_message", "content": "before"}),
    )
    .await;
    run_events(&mut socket).await;

    pg.stop().unwrap();
    let stopped = Instant::now();
    let (ready, _, _) = a.get("/health/ready").await.expect("ready answers");
    assert_eq!(
        ready, 503,
        "unready at the first probe after the database went away"
    );
    // Within one probe period: the operator's readiness probe runs every 5 s.
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "answered after {:?}",
        stopped.elapsed()
    );
    let (live, _, _) = a.get("/health/live").await.expect("live answers");
    assert_eq!(
        live, 200,
        "the process is fine; restarting it would not help"
    );

    send_json(&mut socket, json!({"type": "list_threads"})).await;
    let failed = next_json(&mut socket).await;
    assert_eq!(failed["code"], "storage_unavailable", "{failed}");
    send_json(
        &mut socket,
        json!({"type": "user_message", "content": "during"}),
    )
    .await;
    let failed = next_json(&mut socket).await;
    assert_eq!(failed["code"], "storage_unavailable", "{failed}");
    send_json(&mut socket, json!({"type": "ping"})).await;
    assert_eq!(
        next_json(&mut socket).await["type"],
        "pong",
        "the socket stays open"
    );

    pg.resume().unwrap();
    eventually("the pod is ready again", || async {
        let (status, _, _) = a.get("/health/ready").await?;
        (status == 200).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + PATIENCE;
    loop {
        send_json(&mut socket, json!({"type": "list_threads"})).await;
        let answer = next_json(&mut socket).await;
        if answer["type"] == "threads" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the store never answered again: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restarted_mid_run_loses_no_acknowledged_message() {
    let (mut pg, url) = database("restart");
    let model = Fixture::start(Scenario::Reply(vec!["fine".into()])).await;
    let a = pod_with_model(&url, &model).start().await;
    let mut socket = a.connect_as("ivan").await;
    let mut acknowledged = Vec::new();
    let mut thread_id = Value::Null;
    for i in 0..3 {
        let content = format!("kept {i}");
        send_json(
            &mut socket,
            json!({"type": "user_message", "content": content, "thread_id": thread_id}),
        )
        .await;
        let events = run_events(&mut socket).await;
        assert_eq!(
            events.last().unwrap()["type"],
            "agent_completed",
            "{events:?}"
        );
        thread_id = events[0]["thread_id"].clone();
        acknowledged.push(content);
    }
    // The next run waits in the model while the database restarts under it.
    model.push(Scenario::Gated(vec!["after".into(), " the restart".into()]));
    send_json(
        &mut socket,
        json!({"type": "user_message", "content": "kept 3", "thread_id": thread_id}),
    )
    .await;
    let started = next_json(&mut socket).await;
    assert_eq!(started["type"], "agent_started", "{started}");
    acknowledged.push("kept 3".to_owned());
    loop {
        if next_json(&mut socket).await["type"] == "agent_response" {
            break;
        }
    }
    // The reply is complete while the database is down: storing it has to wait.
    pg.stop().unwrap();
    model.release();
    // An outage longer than the pool waits for a connection (5 s), as a slow
    // restart or a failover takes: the run itself has to retry.
    tokio::time::sleep(Duration::from_secs(6)).await;
    pg.resume().unwrap();
    let rest = run_events(&mut socket).await;
    assert_eq!(
        rest.last().unwrap()["type"],
        "agent_completed",
        "the reply is stored once the database is back: {rest:?}"
    );
    assert!(
        a.stderr().contains("storing the reply failed; retrying"),
        "the run waited for the database rather than finishing after it was back"
    );

    let thread_id = started["thread_id"].clone();
    send_json(
        &mut socket,
        json!({"type": "get_thread", "thread_id": thread_id}),
    )
    .await;
    let answer = next_json(&mut socket).await;
    assert_eq!(answer["type"], "thread", "{answer}");
    let messages = answer["messages"].clone();
    let users: Vec<&str> = messages
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "user")
        .filter_map(|m| m["content"].as_str())
        .collect();
    assert_eq!(users, acknowledged);
    let replies = messages
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "assistant")
        .count();
    assert_eq!(replies, 4, "{messages}");
}
