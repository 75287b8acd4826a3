//! `chatgate-operator render` as people and pipelines run it: the real binary on the
//! repository's examples, judged by its exit code and what it prints.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

fn render(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chatgate-operator"))
        .arg("render")
        .args(args)
        .output()
        .expect("the operator binary starts")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn kubernetes_is_the_default_target_and_prints_what_the_operator_applies() {
    let file = example("chatservice-dev.yaml");
    let file = file.to_str().unwrap();
    let default = render(&[file]);
    assert!(default.status.success(), "{}", text(&default.stderr));
    let explicit = render(&["--target", "kubernetes", "-f", file]);
    assert_eq!(default.stdout, explicit.stdout);
    let out = text(&default.stdout);
    for kind in ["ConfigMap", "Deployment", "Service"] {
        assert!(out.contains(&format!("kind: {kind}\n")), "{out}");
    }
}

#[test]
fn cloud_run_prints_a_knative_service_for_gcloud_run_services_replace() {
    let out = render(&[
        "--target",
        "cloudrun",
        example("chatservice-cloudrun.yaml").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let yaml = text(&out.stdout);
    assert!(
        yaml.starts_with("apiVersion: serving.knative.dev/v1\nkind: Service\n"),
        "{yaml}"
    );
    assert!(yaml.contains("path: /health/startup"), "{yaml}");
    assert!(yaml.contains("name: chat-secrets-jwt-secret"), "{yaml}");
    assert!(
        yaml.contains("run.googleapis.com/startup-cpu-boost"),
        "{yaml}"
    );
}

#[test]
fn what_cloud_run_cannot_do_exits_1_naming_the_field_and_the_limit() {
    // Production drains for 20 s: longer than Cloud Run's 10 s SIGTERM window.
    let out = render(&[
        "--target",
        "cloudrun",
        example("chatservice-production.yaml").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());
    let err = text(&out.stderr);
    assert!(
        err.contains("error: ChatService chat: cannot run on cloudrun: spec.rollout.drainSeconds: is 20 s, but Cloud Run kills an instance 10 s after SIGTERM"),
        "{err}"
    );
    // Knative has no SIGTERM window of its own: the same file renders.
    let knative = render(&[
        "--target",
        "knative",
        example("chatservice-production.yaml").to_str().unwrap(),
    ]);
    assert!(knative.status.success(), "{}", text(&knative.stderr));
}

#[test]
fn validate_checks_an_annotated_chat_service_against_cloud_run() {
    let dir = tempfile::tempdir().unwrap();
    let source = std::fs::read_to_string(example("chatservice-cloudrun.yaml")).unwrap();
    let path = dir.path().join("chat.yaml");
    std::fs::write(&path, source.replace("drainSeconds: 6", "drainSeconds: 9")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_chatgate-operator"))
        .args(["validate", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let table = text(&out.stdout);
    assert!(table.contains("spec.rollout.drainSeconds"), "{table}");
    assert!(table.contains("platform"), "{table}");
}

#[test]
fn an_unreadable_file_exits_2() {
    let out = render(&["--target", "cloudrun", "/nonexistent/chat.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("reading /nonexistent/chat.yaml"));
}
