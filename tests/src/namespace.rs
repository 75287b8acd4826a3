//! One fresh namespace per test, so tests sharing a control plane never see each
//! other's objects, and removed again when the test ends.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;

use crate::control_plane::ControlPlane;
use crate::wait::wait_for;

/// A namespace made for one test. Dropping it deletes the namespace (without
/// waiting); when the test is failing, it first prints the namespace's events and
/// objects into the test's output.
#[derive(Debug)]
pub struct TestNamespace {
    name: String,
    kubectl: PathBuf,
    kubeconfig: PathBuf,
}

impl TestNamespace {
    /// Creates `<prefix>-<unique suffix>` and waits until pods can be created in it
    /// (its `default` service account exists).
    pub async fn new(cp: &ControlPlane, prefix: &str) -> Result<Self> {
        Self::with_labels(cp, prefix, &[]).await
    }

    /// Like [`Self::new`], with labels on the namespace (e.g. a PodSecurity level).
    pub async fn with_labels(
        cp: &ControlPlane,
        prefix: &str,
        labels: &[(&str, &str)],
    ) -> Result<Self> {
        let client = cp.client();
        let name = unique_name(prefix);
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.clone());
        ns.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating test namespace {name}"))?;
        let this = Self {
            name,
            kubectl: cp.bin_dir().join("kubectl"),
            kubeconfig: cp.kubeconfig_path().to_owned(),
        };
        // The ServiceAccount admission plugin refuses pods until the controller
        // manager has made the namespace's `default` account.
        let accounts: Api<ServiceAccount> = Api::namespaced(client, &this.name);
        wait_for(&accounts, "default", Duration::from_secs(30), |_| true)
            .await
            .with_context(|| {
                format!(
                    "namespace {}: the default service account never appeared",
                    this.name
                )
            })?;
        Ok(this)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// An `Api` for a namespaced kind in this namespace.
    pub fn api<K>(&self, client: Client) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
        K: DeserializeOwned + Clone + std::fmt::Debug,
    {
        Api::namespaced(client, &self.name)
    }

    fn kubectl(&self) -> Command {
        let mut cmd = Command::new(&self.kubectl);
        cmd.env("KUBECONFIG", &self.kubeconfig).stdin(Stdio::null());
        cmd
    }

    fn print_state(&self) {
        for args in [
            vec!["get", "events", "--sort-by=.lastTimestamp"],
            vec!["get", "all", "-o", "wide"],
        ] {
            if let Ok(out) = self.kubectl().args(&args).args(["-n", &self.name]).output() {
                eprintln!(
                    "----- kubectl {} -n {} -----\n{}{}",
                    args.join(" "),
                    self.name,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_state();
        }
        // Drop cannot await, and a test's runtime may already be shutting down:
        // kubectl is a plain process and asks only for the deletion to be accepted.
        let _ = self
            .kubectl()
            .args([
                "delete",
                "namespace",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `<prefix>-<n>-<suffix>`: a valid DNS label, unique within and across test
/// binaries sharing a cluster (the suffix mixes the process id and the clock).
fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut seed = (u64::from(std::process::id()) << 32) ^ u64::from(nanos) ^ (u64::from(n) << 16);
    let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let suffix: String = (0..5)
        .map(|_| {
            let c = alphabet[(seed % 36) as usize] as char;
            seed /= 36;
            c
        })
        .collect();
    let clean: String = prefix
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let clean = clean.trim_matches('-');
    let clean = if clean.is_empty() { "test" } else { clean };
    let tail = format!("-{n}-{suffix}");
    let keep = 63 - tail.len();
    format!(
        "{}{tail}",
        &clean[..clean.len().min(keep)].trim_end_matches('-')
    )
}

#[cfg(test)]
mod tests {
    use super::unique_name;

    #[test]
    fn namespace_names_are_valid_dns_labels_and_unique() {
        let a = unique_name("Operator_Test: rollout");
        let b = unique_name("Operator_Test: rollout");
        assert_ne!(a, b);
        for name in [a, b, unique_name(&"x".repeat(100)), unique_name("--")] {
            assert!(name.len() <= 63, "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{name}"
            );
            assert!(!name.starts_with('-') && !name.ends_with('-'), "{name}");
        }
    }
}
