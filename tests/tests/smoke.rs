//! `chatgate-operator smoke` against the real service binary, as a pipeline runs it
//! after a deploy: a running service passes every check (health, upgrade, ping, a
//! chat round trip through the five agent events); one still starting is reported
//! "not ready yet" with exit status 1, never a crash; one that refuses the token is
//! named as such; bad arguments exit 2 naming the flag, and no secret is printed.

use chatgate_tests::image::{test_binaries, workspace_root};
use chatgate_tests::tokens::{AUDIENCE, ISSUER, Signer};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SECRET: &str = "smoke-secret-0123456789abcdef-0123456789";

fn binaries() -> PathBuf {
    test_binaries()
        .expect("the workspace's binaries")
        .unwrap_or_else(|| workspace_root().join("target/release"))
}

/// A service process on a free loopback port; killed when dropped.
struct Service {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    fn start(bin: &Path, extra: &[(&str, String)]) -> Service {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut command = Command::new(bin.join("chatgate-service"));
        for (key, _) in std::env::vars() {
            if key.starts_with("CHATGATE_") {
                command.env_remove(key);
            }
        }
        command
            .current_dir(dir.path())
            .env("CHATGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("CHATGATE_JWT_SECRET", SECRET)
            .env("CHATGATE_JWT_ISSUER", ISSUER)
            .env("CHATGATE_JWT_AUDIENCE", AUDIENCE)
            .env("CHATGATE_DRAIN_SECONDS", "0")
            .env(
                "CHATGATE_TERMINATION_LOG",
                dir.path().join("termination-log"),
            )
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command.spawn().expect("start chatgate-service");
        Service {
            child,
            port,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// Waits until the port answers `path` with `status`.
    fn wait_for(&self, path: &str, status: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if http_status(self.port, path).as_deref() == Some(status) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{path} never answered {status} on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The status code of a plain HTTP GET on loopback, or `None` while nothing answers.
fn http_status(port: u16, path: &str) -> Option<String> {
    let (status, _) = chatgate_tests::http::get_local_blocking(port, path).ok()?;
    Some(status.to_string())
}

fn smoke(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut command = Command::new(bin.join("chatgate-operator"));
    command.env_remove("CHATGATE_SMOKE_TOKEN");
    command.arg("smoke").args(args).envs(env.iter().copied());
    let Output {
        status,
        stdout,
        stderr,
    } = command.output().expect("run chatgate-operator smoke");
    (
        status.code(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// `smoke` with a token it signs itself with `secret` (handed over in the environment).
fn smoke_signed(bin: &Path, url: &str, secret: &str) -> (Option<i32>, String, String) {
    smoke(
        bin,
        &[
            "--url",
            url,
            "--jwt-secret-from",
            "env:SMOKE_JWT_SECRET",
            "--jwt-issuer",
            ISSUER,
            "--jwt-audience",
            AUDIENCE,
        ],
        &[("SMOKE_JWT_SECRET", secret)],
    )
}

/// The row of `check` in the table.
fn row<'a>(table: &'a str, check: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(check))
        .unwrap_or_else(|| panic!("no {check} row in\n{table}"))
}

#[test]
fn a_running_service_passes_every_check() {
    let bin = binaries();
    let service = Service::start(&bin, &[]);
    service.wait_for("/health/startup", "200");
    let url = service.url();
    let (code, out, err) = smoke_signed(&bin, &url, SECRET);
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(row(&out, "health").contains("ok"), "{out}");
    assert!(
        row(&out, "health").contains("ready: 6/6 critical services"),
        "{out}"
    );
    assert!(
        row(&out, "upgrade").contains("connected as chatgate-smoke"),
        "{out}"
    );
    assert!(row(&out, "ping").contains("pong"), "{out}");
    let chat = row(&out, "chat");
    for event in [
        "agent_started",
        "agent_thinking",
        "tool_executing",
        "tool_completed",
        "agent_completed",
    ] {
        assert!(chat.contains(event), "{event} missing: {chat}");
    }
    assert!(!out.contains(SECRET) && !err.contains(SECRET));

    // The same with a token given through the environment, as JSON lines.
    let token = Signer::Secret(SECRET.into())
        .token("chatgate-smoke-2", Duration::from_secs(60))
        .expect("token");
    let (code, out, err) = smoke(
        &bin,
        &["--url", &url, "--output", "json"],
        &[("CHATGATE_SMOKE_TOKEN", &token)],
    );
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    let checks: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(checks.len(), 4, "{out}");
    assert!(checks.iter().all(|c| c["ok"] == true), "{out}");
    assert!(!out.contains(&token));
}

#[test]
fn a_service_still_starting_is_not_ready_yet() {
    let bin = binaries();
    // A database that never answers keeps startup in the storage phase.
    let dead = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let service = Service::start(
        &bin,
        &[
            (
                "CHATGATE_DATABASE_URL",
                format!("postgres://chat:pw@127.0.0.1:{dead}/chat"),
            ),
            ("CHATGATE_STARTUP_BUDGET_SECONDS", "120".into()),
        ],
    );
    service.wait_for("/health/live", "200");
    let url = service.url();
    let (code, out, err) = smoke(
        &bin,
        &["--url", &url, "--jwt-secret-from", "env:SMOKE_JWT_SECRET"],
        &[("SMOKE_JWT_SECRET", SECRET)],
    );
    assert_eq!(code, Some(1), "stdout:\n{out}\nstderr:\n{err}");
    let health = row(&out, "health");
    assert!(health.contains("FAILED"), "{out}");
    assert!(
        health.contains("not ready yet: startup is in phase storage"),
        "{out}"
    );
    let upgrade = row(&out, "upgrade");
    assert!(upgrade.contains("not ready yet (503, Retry-After"), "{out}");
    assert!(row(&out, "chat").contains("not run"), "{out}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_refused_token_is_named() {
    let bin = binaries();
    let service = Service::start(&bin, &[]);
    service.wait_for("/health/startup", "200");
    let url = service.url();
    let wrong = "a-different-secret-0123456789abcdef-012345";
    let (code, out, err) = smoke_signed(&bin, &url, wrong);
    assert_eq!(code, Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert!(row(&out, "health").contains("ok"), "{out}");
    assert!(
        row(&out, "upgrade").contains("token refused (401)"),
        "{out}"
    );
    assert!(row(&out, "ping").contains("not run"), "{out}");
    assert!(!out.contains(wrong) && !err.contains(wrong));
}

#[test]
fn bad_arguments_exit_2_naming_what_to_fix() {
    let bin = binaries();
    let (code, _, err) = smoke(
        &bin,
        &["--url", "http://127.0.0.1:1/ws", "--token", "t"],
        &[],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not a ws:// or wss:// URL"), "{err}");
    let (code, _, err) = smoke(&bin, &["--url", "ws://127.0.0.1:1/ws"], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--jwt-secret-from"), "{err}");
    let (code, _, err) = smoke(
        &bin,
        &[
            "--url",
            "ws://127.0.0.1:1/ws",
            "--jwt-secret-from",
            "env:SMOKE_UNSET_SECRET_VARIABLE",
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("SMOKE_UNSET_SECRET_VARIABLE is not set"),
        "{err}"
    );
    // Nothing listening: every check fails, with the address named; no crash.
    let (code, out, err) = smoke(
        &bin,
        &[
            "--url",
            "ws://127.0.0.1:1/ws",
            "--token",
            "t",
            "--timeout",
            "5",
        ],
        &[],
    );
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(row(&out, "health").contains("cannot be reached"), "{out}");
}
