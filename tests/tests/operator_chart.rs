//! The Helm chart: it lints and renders cleanly, carries the same generated CRD as
//! `crds/`, and installs on the real control plane into a namespace enforcing the
//! `restricted` Pod Security profile, where Helm 4 waits for it with kstatus.

mod operator_support;

use anyhow::Result;
use chatgate_tests::ControlPlane;
use operator_support::*;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/chatgate-operator");

fn run_ok(mut cmd: std::process::Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_lints_renders_and_installs_under_restricted_pod_security() -> Result<()> {
    let cp = ControlPlane::shared().await;

    let mut lint = cp.helm();
    lint.args(["lint", "--strict", CHART]);
    run_ok(lint, "helm lint");

    let chart_crd =
        std::fs::read_to_string(format!("{CHART}/crds/chatservices.chatgate.dev.yaml"))?;
    let crd = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds/chatservices.chatgate.dev.yaml"
    ))?;
    assert_eq!(
        chart_crd, crd,
        "the chart's CRD is the generated one (hack/gen-crds.sh)"
    );

    let ns = restricted_namespace(cp, "op-chart").await?;
    let mut template = cp.helm();
    template.args([
        "template",
        "chatgate",
        CHART,
        "--namespace",
        ns.name(),
        "--include-crds",
    ]);
    let rendered = run_ok(template, "helm template");
    for kind in [
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
    ] {
        assert!(
            rendered.contains(&format!("kind: {kind}\n")),
            "helm template renders no {kind}"
        );
    }

    // kwok runs the pods (no container starts), so this proves admission — Pod
    // Security `restricted`, RBAC objects, the CRD — and Helm's kstatus wait.
    let release = ns.name().to_owned();
    let mut install = cp.helm();
    install.args([
        "install",
        &release,
        CHART,
        "--namespace",
        ns.name(),
        "--wait",
        "--timeout",
        "120s",
    ]);
    run_ok(install, "helm install");
    let mut status = cp.helm();
    status.args(["status", &release, "--namespace", ns.name()]);
    assert!(run_ok(status, "helm status").contains("deployed"));
    let mut uninstall = cp.helm();
    uninstall.args(["uninstall", &release, "--namespace", ns.name(), "--wait"]);
    run_ok(uninstall, "helm uninstall");
    Ok(())
}
