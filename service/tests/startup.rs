//! Startup, health endpoints, configuration and the termination message, against
//! the real binary.

mod common;

use chatgate_contract::CriticalService;
use common::*;
use serde_json::Value;
use std::time::Duration;

#[tokio::test]
async fn startup_runs_every_phase_in_order_and_reports_timings() {
    let mut service = ServiceBuilder::new().spawn();
    let took = service.wait_started().await;
    let (status, report, _) = service.get("/health/startup").await.expect("answer");
    assert_eq!(status, 200);
    assert_eq!(report["state"], "ready");
    let names: Vec<&str> = report["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .map(|p| p["name"].as_str().expect("name"))
        .collect();
    assert_eq!(
        names,
        [
            "config",
            "auth",
            "storage",
            "llm",
            "bridge",
            "supervisor",
            "validate"
        ]
    );
    for phase in report["phases"].as_array().expect("phases") {
        assert_eq!(phase["status"], "done", "{phase}");
        assert!(phase["duration_ms"].is_u64(), "{phase}");
        assert_eq!(phase["attempts"], 1, "{phase}");
    }
    for s in report["services"].as_array().expect("services") {
        assert_eq!(s["state"], "ready", "{s}");
    }
    let (ready, _, _) = service.get("/health/ready").await.expect("answer");
    assert_eq!(ready, 200);
    let (live, _, _) = service.get("/health/live").await.expect("answer");
    assert_eq!(live, 200);
    eprintln!("started in {took:?} (debug build, including process spawn)");

    // Each phase was logged, in JSON with the fields log collectors read.
    let logs = service.stderr();
    let phases: Vec<String> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["message"] == "startup phase done")
        .map(|l| {
            assert!(l["severity"] == "INFO" && l["time"].is_string(), "{l}");
            l["phase"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    assert_eq!(
        phases,
        [
            "config",
            "auth",
            "storage",
            "llm",
            "bridge",
            "supervisor",
            "validate"
        ]
    );
}

#[tokio::test]
async fn ws_before_startup_is_refused_with_503() {
    // A database that never answers keeps startup in the storage phase, retrying.
    let dead = free_port();
    let mut service = ServiceBuilder::new()
        .env(
            "CHATGATE_DATABASE_URL",
            &format!("postgres://chat:pw@127.0.0.1:{dead}/chat"),
        )
        .env("CHATGATE_STARTUP_BUDGET_SECONDS", "120")
        .spawn();
    let report = eventually("storage has been retried twice", || async {
        let (status, report, _) = service.get("/health/startup").await?;
        assert_eq!(status, 503, "{report}");
        let storage = report["phases"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == "storage")?
            .clone();
        (storage["status"] == "retrying" && storage["attempts"].as_u64()? >= 2).then_some(report)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; stderr:\n{}", service.stderr()));
    assert_eq!(report["state"], "starting");
    assert_eq!(report["phase"], "storage");
    let storage = &report["phases"][2];
    assert!(
        storage["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("127.0.0.1")),
        "{storage}"
    );
    assert_eq!(report["services"][2]["state"], "missing");

    let refused = service.connect(&token("alice")).await.expect_err("refused");
    let (status, body) = refusal(refused);
    assert_eq!(status, 503);
    assert_eq!(body["error"], "starting");
    assert_eq!(body["phase"], "storage");

    // Retry-After is on the response (checked over plain HTTP, which shows headers).
    let (status, _, headers) = service.get("/ws").await.expect("answer");
    assert_eq!(status, 503);
    assert!(headers.contains_key("retry-after"));

    let (ready, _, _) = service.get("/health/ready").await.expect("answer");
    assert_eq!(ready, 503);
    let (live, _, _) = service.get("/health/live").await.expect("answer");
    assert_eq!(live, 200, "liveness never depends on dependencies");
    // The aggregate check answers like readiness, with the whole report.
    let (health, report, _) = service.get("/health").await.expect("answer");
    assert_eq!(health, 503);
    assert_eq!(report["state"], "starting");
    assert_eq!(report["phase"], "storage");
    assert_eq!(report["services"][2]["name"], "thread_store");

    // The metrics say the same: every refusal counted as 503/starting, the thread
    // store missing, and a startup duration that grows while startup runs.
    let first = service.metrics().await;
    let series = "chatgate_ws_upgrades_total{code=\"503\",result=\"starting\"}";
    assert_eq!(sample(&first, series), Some(2.0), "{first}");
    assert_eq!(sample(&first, "chatgate_startup_complete"), Some(0.0));
    let up = |service: &str| format!("chatgate_critical_service_up{{service=\"{service}\"}}");
    assert_eq!(sample(&first, &up("configuration")), Some(1.0), "{first}");
    assert_eq!(sample(&first, &up("thread_store")), Some(0.0), "{first}");
    assert_eq!(
        sample(&first, &up("agent_supervisor")),
        Some(0.0),
        "{first}"
    );
    let before = sample(&first, "chatgate_startup_duration_seconds").expect("duration");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = service.metrics().await;
    let after = sample(&later, "chatgate_startup_duration_seconds").expect("duration");
    assert!(after >= before + 0.25, "{before} then {after}");
    service.child.kill().await.ok();
}

#[tokio::test]
async fn a_dependency_that_never_comes_ends_startup_at_the_budget() {
    let dead = free_port();
    let mut service = ServiceBuilder::new()
        .env(
            "CHATGATE_DATABASE_URL",
            &format!("postgres://chat:pw@127.0.0.1:{dead}/chat"),
        )
        .env("CHATGATE_STARTUP_BUDGET_SECONDS", "1")
        .spawn();
    let status = service.exit_status().await;
    assert_eq!(status.code(), Some(1), "{}", service.stderr());
    let line = service.termination_log();
    assert!(
        line.starts_with("phase=storage service=thread_store: startup did not finish within CHATGATE_STARTUP_BUDGET_SECONDS"),
        "{line}"
    );
    assert_eq!(line.lines().count(), 1);
}

#[tokio::test]
async fn a_permanent_storage_failure_exits_naming_the_thread_store() {
    let mut service = ServiceBuilder::new()
        .env("CHATGATE_DATABASE_URL", "mysql://db/chat")
        .spawn();
    let status = service.exit_status().await;
    assert_eq!(status.code(), Some(1));
    let line = service.termination_log();
    assert!(
        line.starts_with("phase=storage service=thread_store: CHATGATE_DATABASE_URL"),
        "{line}"
    );
}

/// A staging database: PostgreSQL (startup fails before it would connect).
const STAGING_DATABASE: &str = "postgres://chat@127.0.0.1:1/chat";

#[tokio::test]
async fn staging_on_sqlite_exits_naming_the_database_key_and_what_to_use() {
    for env in ["staging", "production"] {
        let mut service = ServiceBuilder::new()
            .env("CHATGATE_ENV", env)
            .env("CHATGATE_DATABASE_URL", "sqlite:///tmp/secret-name-chat.db")
            .spawn();
        assert_eq!(service.exit_status().await.code(), Some(1), "{env}");
        let line = service.termination_log();
        assert!(
            line.starts_with(&format!(
                "phase=storage service=thread_store: CHATGATE_DATABASE_URL uses SQLite, which keeps each pod's threads inside that pod; {env} runs two or more replicas"
            )),
            "{line}"
        );
        assert!(line.contains("PostgreSQL"), "{line}");
        assert!(
            !line.contains("secret-name-chat") && !service.stderr().contains("secret-name-chat"),
            "the URL itself is a secret: {line}"
        );
    }
}

/// A password-bearing URL pasted with its quotes: the key and the fix are named, and no
/// character of the password reaches the termination message or the logs.
#[tokio::test]
async fn a_malformed_secret_is_named_but_never_echoed() {
    let mut service = ServiceBuilder::new()
        .env(
            "CHATGATE_DATABASE_URL",
            "\"postgres://chat:Hunter2Secret@db:5432/chat\"",
        )
        .spawn();
    assert_eq!(service.exit_status().await.code(), Some(1));
    let line = service.termination_log();
    assert!(
        line.starts_with("phase=storage service=thread_store: CHATGATE_DATABASE_URL"),
        "{line}"
    );
    assert!(line.contains("wrapped in quotes — remove them"), "{line}");
    for (surface, text) in [
        ("termination message", line),
        ("stderr", service.stderr()),
        ("stdout", service.stdout()),
    ] {
        assert!(!text.contains("Hunter2Secret"), "{surface}: {text}");
    }
}

/// A public key pointed at the wrong Secret key (one holding an HS256 secret) is
/// named, and the value stays out of the termination message and the logs.
#[tokio::test]
async fn a_public_key_holding_something_else_is_named_but_never_echoed() {
    let mut service = ServiceBuilder::new()
        .env("CHATGATE_JWT_ALGORITHM", "RS256")
        .env(
            "CHATGATE_JWT_PUBLIC_KEY",
            "827d9b9d3d0f33d3bd7b6972346Secret",
        )
        .spawn();
    assert_eq!(service.exit_status().await.code(), Some(1));
    let line = service.termination_log();
    assert!(
        line.starts_with(
            "phase=auth service=jwt_verifier: CHATGATE_JWT_PUBLIC_KEY is neither a PEM key"
        ),
        "{line}"
    );
    for (surface, text) in [
        ("termination message", line),
        ("stderr", service.stderr()),
        ("stdout", service.stdout()),
    ] {
        assert!(!text.contains("6972346Secret"), "{surface}: {text}");
    }
}

/// While the database is retried, its password stays out of `/health/startup` and the logs.
#[tokio::test]
async fn a_database_password_never_reaches_health_or_logs_while_retrying() {
    let dead = free_port();
    let mut service = ServiceBuilder::new()
        .env(
            "CHATGATE_DATABASE_URL",
            &format!("postgres://chat:Hunter2Secret@127.0.0.1:{dead}/chat"),
        )
        .env("CHATGATE_STARTUP_BUDGET_SECONDS", "120")
        .spawn();
    let report = eventually("storage has been retried twice", || async {
        let (_, report, _) = service.get("/health/startup").await?;
        let storage = report["phases"].as_array()?.get(2)?.clone();
        (storage["attempts"].as_u64()? >= 2).then_some(report)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; stderr:\n{}", service.stderr()));
    assert!(
        report["phases"][2]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("CHATGATE_DATABASE_URL")),
        "{report}"
    );
    assert!(!report.to_string().contains("Hunter2Secret"), "{report}");
    service.signal("TERM");
    let _ = service.exit_status().await;
    assert!(
        !service.stderr().contains("Hunter2Secret"),
        "{}",
        service.stderr()
    );
    assert!(!service.termination_log().contains("Hunter2Secret"));
}

/// The seed scenario: staging configured for the OpenAI provider without its key.
#[tokio::test]
async fn staging_openai_without_api_key_exits_naming_the_key() {
    let mut service = ServiceBuilder::new()
        .env("CHATGATE_ENV", "staging")
        .env("CHATGATE_DATABASE_URL", STAGING_DATABASE)
        .env("CHATGATE_LLM_PROVIDER", "openai")
        .spawn();
    let status = service.exit_status().await;
    assert_eq!(status.code(), Some(1));
    let line = service.termination_log();
    assert!(
        line.starts_with("phase=llm service=llm_client: CHATGATE_LLM_API_KEY is required in staging when CHATGATE_LLM_PROVIDER is openai"),
        "{line}"
    );
    assert_eq!(line.trim_end().lines().count(), 1);
    // The same line is logged, as an error, for people reading the logs.
    assert!(
        service
            .stderr()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|l| l["severity"] == "ERROR"
                && l["cause"]
                    .as_str()
                    .is_some_and(|c| c.contains("CHATGATE_LLM_API_KEY"))),
        "{}",
        service.stderr()
    );
}

#[tokio::test]
async fn staging_without_a_jwt_secret_exits_naming_the_key_and_the_verifier() {
    let mut service = ServiceBuilder::new()
        .env("CHATGATE_ENV", "staging")
        .env("CHATGATE_DATABASE_URL", STAGING_DATABASE)
        .without("CHATGATE_JWT_SECRET")
        .spawn();
    assert_eq!(service.exit_status().await.code(), Some(1));
    let line = service.termination_log();
    assert!(
        line.starts_with(
            "phase=auth service=jwt_verifier: CHATGATE_JWT_SECRET is required in staging"
        ),
        "{line}"
    );
}

#[tokio::test]
async fn every_configuration_problem_is_reported_at_once() {
    let mut service = ServiceBuilder::new()
        .env("CHATGATE_MAX_CONNECTIONS", "lots")
        .env("CHATGATE_JWT_ISUER", "typo")
        .spawn();
    assert_eq!(service.exit_status().await.code(), Some(1));
    let line = service.termination_log();
    assert!(
        line.starts_with("phase=config service=configuration: "),
        "{line}"
    );
    assert!(
        line.contains("CHATGATE_JWT_ISUER") && line.contains("CHATGATE_JWT_ISSUER"),
        "{line}"
    );
    assert!(line.contains("CHATGATE_MAX_CONNECTIONS"), "{line}");
}

#[tokio::test]
async fn an_unwritable_termination_log_is_logged_and_the_exit_still_happens() {
    let mut service = ServiceBuilder::new()
        .env(
            "CHATGATE_TERMINATION_LOG",
            "/nonexistent-dir/termination-log",
        )
        .env("CHATGATE_DATABASE_URL", "mysql://db/chat")
        .spawn();
    assert_eq!(service.exit_status().await.code(), Some(1));
    assert!(
        service
            .stderr()
            .contains("cannot write the termination message"),
        "{}",
        service.stderr()
    );
}

#[tokio::test]
async fn development_without_a_secret_prints_a_working_token() {
    let service = ServiceBuilder::new()
        .without("CHATGATE_JWT_SECRET")
        .without("CHATGATE_JWT_ISSUER")
        .without("CHATGATE_JWT_AUDIENCE")
        .start()
        .await;
    let stdout = service.stdout();
    let token = stdout
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("websocat -H 'Authorization: Bearer ")
                .and_then(|rest| rest.split('\'').next())
        })
        .unwrap_or_else(|| panic!("no websocat line in:\n{stdout}"))
        .to_string();
    let mut socket = service.connect(&token).await.expect("the dev token works");
    assert_eq!(next_json(&mut socket).await["user_id"], "dev-user");
}

#[tokio::test]
async fn the_config_file_is_read_and_the_environment_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("chatgate.yaml");
    std::fs::write(
        &file,
        "CHATGATE_MAX_CONNECTIONS_PER_USER: 1\nCHATGATE_JWT_AUDIENCE: from-the-file\n",
    )
    .expect("write config");
    let service = ServiceBuilder::new()
        .arg("--config")
        .arg(file.to_str().expect("utf-8"))
        .start()
        .await;
    // The audience from the environment wins (the test token carries it)...
    let _first = service.connect_as("carol").await;
    // ...and the per-user limit comes from the file.
    let mut second = service.connect(&token("carol")).await.expect("upgrade");
    assert_eq!(close_code(&mut second).await, 1013);
}

#[tokio::test]
async fn print_config_redacts_secrets_and_explain_describes_a_key() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_chatgate-service"))
        .arg("--print-config")
        .env(
            "CHATGATE_JWT_SECRET",
            "super-secret-value-that-must-not-show",
        )
        .env("CHATGATE_DATABASE_URL", "postgres://u:hunter2@db/chat")
        .output()
        .await
        .expect("run --print-config");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("CHATGATE_JWT_SECRET=<redacted>"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("super-secret") && !stdout.contains("hunter2"),
        "{stdout}"
    );
    assert!(
        stdout.contains("CHATGATE_LISTEN=127.0.0.1:8080 (default)"),
        "{stdout}"
    );

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_chatgate-service"))
        .args(["--explain", "CHATGATE_LLM_API_KEY"])
        .output()
        .await
        .expect("run --explain");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(
        stdout.contains(
            "required: in development, staging, production, when CHATGATE_LLM_PROVIDER is openai"
        ),
        "{stdout}"
    );
}

#[tokio::test]
async fn metrics_report_startup_and_connections() {
    let service = ServiceBuilder::new().start().await;
    let _socket = service.connect_as("dave").await;
    let _ = service.connect("garbage").await;
    let (status, body, headers) = service.get("/metrics").await.expect("answer");
    assert_eq!(status, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap_or_default()
            .contains("openmetrics")
    );
    let text = body.as_str().expect("text");
    for needle in [
        "chatgate_startup_complete 1",
        "chatgate_ws_active_connections 1",
        "chatgate_ws_upgrades_total{code=\"101\",result=\"accepted\"} 1",
        "chatgate_ws_upgrades_total{code=\"401\",result=\"unauthorized\"} 1",
        "chatgate_startup_phase_duration_seconds{phase=\"storage\"}",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    for service in CriticalService::ALL {
        let series = format!(
            "chatgate_critical_service_up{{service=\"{}\"}}",
            service.as_str()
        );
        assert_eq!(sample(text, &series), Some(1.0), "{series} in\n{text}");
    }
    // Once complete, the startup duration is what it took, not the uptime.
    let took = sample(text, "chatgate_startup_duration_seconds").expect("duration");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = service.metrics().await;
    assert_eq!(
        sample(&again, "chatgate_startup_duration_seconds"),
        Some(took)
    );

    let (status, report, _) = service.get("/health").await.expect("answer");
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["state"], "ready");
    assert_eq!(
        report["services"].as_array().map(Vec::len),
        Some(CriticalService::ALL.len())
    );
    assert!(
        report["services"]
            .as_array()
            .expect("services")
            .iter()
            .all(|s| s["state"] == "ready"),
        "{report}"
    );
}
