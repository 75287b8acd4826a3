//! `chatgate-operator render --target cloudrun|knative` prints manifests the real API
//! server accepts: the Knative Service CRD (tests/data/knative) is installed in the
//! test control plane and every rendered manifest is applied with server-side dry run
//! and strict field validation, so a misspelt or misplaced field fails here.

use anyhow::{Context, Result, bail};
use chatgate_operator::render::render_target;
use chatgate_operator::serverless::Target;
use chatgate_tests::{ControlPlane, TestNamespace};
use std::io::Write;
use std::process::{Command, Stdio};

const KNATIVE_CRD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/data/knative/services.serving.knative.dev.yaml"
);
const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");

fn run(mut cmd: Command, input: Option<&str>, what: &str) -> Result<String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {what}"))?;
    if let Some(text) = input {
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(text.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!(
            "{what} failed:\n{text}\n--- input ---\n{}",
            input.unwrap_or("")
        );
    }
    Ok(text)
}

async fn knative_crd_installed(cp: &ControlPlane) -> Result<()> {
    let mut apply = cp.kubectl();
    apply.args(["apply", "--server-side", "-f", KNATIVE_CRD]);
    run(apply, None, "kubectl apply of the Knative Service CRD")?;
    let mut wait = cp.kubectl();
    wait.args([
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/services.serving.knative.dev",
    ]);
    run(wait, None, "kubectl wait for the Knative Service CRD")?;
    Ok(())
}

fn rendered(file: &str, target: Target) -> Result<String> {
    let text = std::fs::read_to_string(format!("{EXAMPLES}/{file}"))?;
    let mut warnings = Vec::new();
    render_target(&text, "default", target, &mut warnings)
        .map_err(|e| anyhow::anyhow!("rendering {file} for {}: {e:?}", target.as_str()))
}

fn dry_run(cp: &ControlPlane, ns: &str, manifest: &str, what: &str) -> Result<String> {
    let mut apply = cp.kubectl();
    apply.args([
        "apply",
        "--server-side",
        "--dry-run=server",
        "--validate=strict",
        "--field-manager=chatgate-tests",
        "-n",
        ns,
        "-f",
        "-",
    ]);
    run(apply, Some(manifest), what)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_cloud_run_and_knative_services_pass_server_side_dry_run() -> Result<()> {
    let cp = ControlPlane::shared().await;
    knative_crd_installed(cp).await?;
    let ns = TestNamespace::new(cp, "render").await?;
    for file in ["chatservice-dev.yaml", "chatservice-cloudrun.yaml"] {
        for target in [Target::Cloudrun, Target::Knative] {
            let manifest = rendered(file, target)?;
            // Knative manifests name their namespace; Cloud Run ones leave it to
            // gcloud (the project), so kubectl's -n applies.
            let manifest =
                manifest.replace("namespace: default", &format!("namespace: {}", ns.name()));
            let out = dry_run(
                cp,
                ns.name(),
                &manifest,
                &format!("dry run of {file} rendered for {}", target.as_str()),
            )?;
            assert!(
                out.contains("service.serving.knative.dev/") && out.contains("(server dry run)"),
                "{out}"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misplaced_field_is_refused_by_the_dry_run_so_the_check_has_teeth() -> Result<()> {
    let cp = ControlPlane::shared().await;
    knative_crd_installed(cp).await?;
    let ns = TestNamespace::new(cp, "render-bad").await?;
    let manifest = rendered("chatservice-dev.yaml", Target::Cloudrun)?
        .replace("containerConcurrency:", "containerConcurency:");
    let err = dry_run(cp, ns.name(), &manifest, "dry run of a misspelt field")
        .expect_err("a misspelt field must be refused");
    assert!(
        format!("{err:#}").contains("containerConcurency"),
        "{err:#}"
    );
    Ok(())
}
