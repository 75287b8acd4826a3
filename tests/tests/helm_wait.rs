//! Helm against the real control plane: the chart's values schema refuses a wrong
//! value with a message naming it, and Helm 4's `--wait` (kstatus) waits for the
//! ChatServices in a release — returning once they are Ready, failing when one is
//! Stalled.

mod operator_support;

use anyhow::Result;
use chatgate_operator::crd::ChatService;
use chatgate_tests::ControlPlane;
use kube::api::Api;
use operator_support::*;
use std::time::{Duration, Instant};

const OPERATOR_CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/chatgate-operator");
const CHAT_RELEASE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/charts/chat-release");

fn helm(cp: &ControlPlane, args: &[&str]) -> (bool, String, Duration) {
    let started = Instant::now();
    let out = cp
        .helm()
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running helm {}: {e}", args.join(" ")));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        started.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_chart_value_fails_helm_install_naming_the_value() -> Result<()> {
    let cp = ControlPlane::shared().await;
    let ns = restricted_namespace(cp, "helm-schema").await?;
    for (set, named) in [
        ("replicas=two", "replicas"),
        ("logFormat=yaml", "logFormat"),
        ("leaderElection.enabld=true", "enabld"),
    ] {
        let (ok, out, _) = helm(
            cp,
            &[
                "install",
                "bad",
                OPERATOR_CHART,
                "--namespace",
                ns.name(),
                "--set",
                set,
            ],
        );
        assert!(!ok, "helm install --set {set} succeeded:\n{out}");
        assert!(
            out.contains("values don't meet the specifications of the schema")
                && out.contains(named),
            "helm install --set {set}:\n{out}"
        );
    }
    let (ok, out, _) = helm(cp, &["list", "--namespace", ns.name(), "-q"]);
    assert!(ok && out.trim().is_empty(), "nothing was installed: {out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_wait_returns_once_the_chat_service_is_ready() -> Result<()> {
    let Setup { cp, ns, admin, op } = operator_in_new_namespace("helm-wait").await?;
    let (ok, out, _) = helm(
        cp,
        &[
            "install",
            "chat",
            CHAT_RELEASE,
            "--namespace",
            ns.name(),
            "--wait",
            "--timeout",
            "120s",
        ],
    );
    assert!(ok, "helm install --wait failed:\n{out}");
    // Helm returned: the ChatService is Ready for its current generation already.
    let api: Api<ChatService> = ns.api(admin.clone());
    let cs = api.get("chat").await?;
    assert!(ready_now(&cs), "{:?}", cs.status);
    op.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_wait_fails_when_the_chat_service_is_stalled() -> Result<()> {
    let Setup { cp, ns, op, .. } = operator_in_new_namespace("helm-stalled").await?;
    // Staging without its JWT settings: the operator stalls it (InvalidConfig).
    let (ok, out, took) = helm(
        cp,
        &[
            "install",
            "chat",
            CHAT_RELEASE,
            "--namespace",
            ns.name(),
            "--set",
            "environment=staging",
            "--wait",
            "--timeout",
            "100s",
        ],
    );
    assert!(
        !ok,
        "helm install --wait succeeded on a stalled ChatService:\n{out}"
    );
    assert!(out.contains("ChatService"), "{out}");
    assert!(
        took < Duration::from_secs(90),
        "helm waited {took:?} (its whole timeout) instead of failing on Stalled:\n{out}"
    );
    op.stop().await;
    Ok(())
}
