//! LLM providers: the builtin's determinism, and the OpenAI-compatible client against
//! a chat-completions fixture server on loopback (streaming, errors, broken streams).

mod openai_fixture;

use std::time::Duration;

use chatgate_service::llm::{
    LlmClient, LlmError, LlmRequest, PromptMessage, PromptRole, ToolResult, builtin_reply,
};
use futures::StreamExt;
use openai_fixture::{Fixture, Scenario};

fn request(text: &str) -> LlmRequest {
    LlmRequest {
        history: vec![PromptMessage {
            role: PromptRole::User,
            content: text.to_owned(),
        }],
        tool_results: vec![ToolResult {
            tool: "word_count".to_owned(),
            result: "3 words, 17 characters".to_owned(),
        }],
    }
}

fn openai(fixture: &Fixture) -> LlmClient {
    LlmClient::from_config(
        "openai",
        Some("sk-test-key".to_owned()),
        &fixture.base_url,
        "fixture-model",
    )
    .expect("an openai client for the fixture")
}

/// Collects a reply: the deltas before the first error, and that error.
async fn collect(client: &LlmClient, req: &LlmRequest) -> (Vec<String>, Option<LlmError>) {
    let mut stream = match client.stream_reply(req).await {
        Ok(stream) => stream,
        Err(e) => return (Vec::new(), Some(e)),
    };
    let mut deltas = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(delta) => deltas.push(delta),
            Err(e) => {
                assert!(
                    stream.next().await.is_none(),
                    "a stream ends after its error"
                );
                return (deltas, Some(e));
            }
        }
    }
    (deltas, None)
}

fn assert_unavailable(error: Option<LlmError>, needle: &str) -> String {
    match error {
        Some(e @ LlmError::Unavailable { .. }) => {
            assert_eq!(e.code(), "llm_unavailable");
            assert!(!e.is_permanent());
            let text = e.to_string();
            assert!(
                text.contains(needle),
                "error `{text}` should mention `{needle}`"
            );
            text
        }
        other => panic!("expected an Unavailable error mentioning {needle}, got {other:?}"),
    }
}

#[tokio::test]
async fn builtin_gives_the_same_chunks_for_the_same_input() {
    let client = LlmClient::from_config("builtin", None, "", "").unwrap();
    assert_eq!(client.provider(), "builtin");
    let req = request("hello there, agent");
    let (first, error) = collect(&client, &req).await;
    assert!(error.is_none());
    let (second, _) = collect(&client, &req).await;
    assert_eq!(first, second);
    assert_eq!(first, builtin_reply(&req));
    assert!(
        first.len() >= 3,
        "the reply streams in several chunks: {first:?}"
    );
    let text = first.concat();
    assert!(text.contains("hello there, agent"), "{text}");
    assert!(text.contains("word_count"), "{text}");
    assert!(text.contains("3 words, 17 characters"), "{text}");

    let (other, _) = collect(&client, &request("something else entirely")).await;
    assert_ne!(first, other, "the reply is derived from the input");
}

#[tokio::test]
async fn builtin_bounds_the_chunk_count_of_long_messages() {
    let long = "word ".repeat(5_000);
    let chunks = builtin_reply(&request(&long));
    assert!(chunks.len() <= 12, "{} chunks", chunks.len());
    assert!(chunks.concat().len() < 1_000);
}

#[tokio::test]
async fn openai_streams_deltas_and_sends_key_model_history_and_tool_result() {
    let fixture = Fixture::start(Scenario::Reply(vec!["Hello".into(), ", world".into()])).await;
    let client = openai(&fixture);
    assert_eq!(client.provider(), "openai");
    let (deltas, error) = collect(&client, &request("hi there")).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(deltas, vec!["Hello".to_owned(), ", world".to_owned()]);

    let requests = fixture.requests();
    assert_eq!(requests.len(), 1);
    let sent = &requests[0];
    assert_eq!(sent.authorization.as_deref(), Some("Bearer sk-test-key"));
    assert_eq!(sent.body["model"], "fixture-model");
    assert_eq!(sent.body["stream"], true);
    let messages = sent.body["messages"].as_array().unwrap();
    let last = messages.last().unwrap();
    assert_eq!(last["role"], "user");
    assert_eq!(last["content"], "hi there");
    assert!(
        messages.iter().any(|m| m["role"] == "system"
            && m["content"]
                .as_str()
                .is_some_and(|c| c.contains("word_count") && c.contains("3 words"))),
        "the tool result is part of the prompt: {messages:?}"
    );
}

#[tokio::test]
async fn openai_parses_events_split_at_every_byte_with_crlf() {
    let fixture = Fixture::start(Scenario::ByteByByte(vec![
        "ünï".into(),
        "cødé ".into(),
        "🙂".into(),
    ]))
    .await;
    let (deltas, error) = collect(&openai(&fixture), &request("x")).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(deltas.concat(), "ünïcødé 🙂");
}

#[tokio::test]
async fn openai_without_a_key_names_the_key() {
    for key in [None, Some(String::new()), Some("   ".to_owned())] {
        let error = LlmClient::from_config("openai", key, "https://api.openai.com/v1", "m")
            .expect_err("a key is required");
        assert!(error.is_permanent());
        assert!(
            error.to_string().contains("CHATGATE_LLM_API_KEY"),
            "{error}"
        );
    }
}

#[tokio::test]
async fn configuration_errors_name_their_key() {
    let e = LlmClient::from_config("gemini", None, "", "").unwrap_err();
    assert!(
        e.is_permanent() && e.to_string().contains("CHATGATE_LLM_PROVIDER"),
        "{e}"
    );
    let e = LlmClient::from_config("openai", Some("k".into()), "not a url", "m").unwrap_err();
    assert!(
        e.is_permanent() && e.to_string().contains("CHATGATE_LLM_BASE_URL"),
        "{e}"
    );
    let e = LlmClient::from_config("openai", Some("k".into()), "ftp://x/v1", "m").unwrap_err();
    assert!(e.to_string().contains("CHATGATE_LLM_BASE_URL"), "{e}");
    let e = LlmClient::from_config("openai", Some("k".into()), "http://x/v1", " ").unwrap_err();
    assert!(e.to_string().contains("CHATGATE_LLM_MODEL"), "{e}");
}

#[tokio::test]
async fn openai_client_never_shows_its_key_in_debug_output() {
    let fixture = Fixture::start(Scenario::Echo).await;
    let shown = format!("{:?}", openai(&fixture));
    assert!(!shown.contains("sk-test-key"), "{shown}");
}

#[tokio::test]
async fn upstream_500_is_llm_unavailable_with_the_provider_message() {
    let fixture = Fixture::start(Scenario::Status(500, "the model fell over".into())).await;
    let (deltas, error) = collect(&openai(&fixture), &request("x")).await;
    assert!(deltas.is_empty());
    let text = assert_unavailable(error, "500");
    assert!(text.contains("the model fell over"), "{text}");
}

#[tokio::test]
async fn rejected_key_points_at_the_key() {
    let fixture = Fixture::start(Scenario::Status(401, "invalid api key".into())).await;
    let (_, error) = collect(&openai(&fixture), &request("x")).await;
    assert_unavailable(error, "CHATGATE_LLM_API_KEY");
}

#[tokio::test]
async fn broken_stream_is_llm_unavailable_after_the_partial_reply() {
    let fixture = Fixture::start(Scenario::Broken).await;
    let mut stream = openai(&fixture).stream_reply(&request("x")).await.unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap(), "partial");
    fixture.release();
    assert_unavailable(stream.next().await.and_then(Result::err), "broke");
    assert!(stream.next().await.is_none());
}

#[tokio::test]
async fn stream_ending_without_done_is_llm_unavailable() {
    let fixture = Fixture::start(Scenario::Truncated).await;
    let (deltas, error) = collect(&openai(&fixture), &request("x")).await;
    assert_eq!(deltas, vec!["partial".to_owned()]);
    assert_unavailable(error, "ended before");
}

#[tokio::test]
async fn error_event_inside_the_stream_is_llm_unavailable() {
    let fixture = Fixture::start(Scenario::InlineError).await;
    let (deltas, error) = collect(&openai(&fixture), &request("x")).await;
    assert_eq!(deltas, vec!["partial".to_owned()]);
    assert_unavailable(error, "model overloaded");
}

#[tokio::test]
async fn stalled_stream_fails_after_the_idle_timeout() {
    let fixture = Fixture::start(Scenario::Stall).await;
    let client = openai(&fixture).with_stream_idle_timeout(Duration::from_millis(300));
    let (deltas, error) =
        tokio::time::timeout(Duration::from_secs(10), collect(&client, &request("x")))
            .await
            .expect("the idle timeout ends a stalled stream");
    assert_eq!(deltas, vec!["partial".to_owned()]);
    assert_unavailable(error, "stalled");
}

#[tokio::test]
async fn unreachable_provider_is_llm_unavailable() {
    // A port that was just free: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let client = LlmClient::from_config(
        "openai",
        Some("k".into()),
        &format!("http://127.0.0.1:{port}/v1"),
        "m",
    )
    .unwrap();
    let (_, error) = collect(&client, &request("x")).await;
    assert_unavailable(error, "cannot reach");
}
