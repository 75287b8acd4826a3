//! chatgate's test harness: a real Kubernetes control plane built from the Go module
//! proxy and started on loopback, one per test binary, with a namespace per test
//! and helpers that wait on conditions instead of sleeping.
//!
//! ```no_run
//! use chatgate_tests::{ControlPlane, TestNamespace, wait};
//! use k8s_openapi::api::apps::v1::Deployment;
//! # async fn example() -> anyhow::Result<()> {
//! let cp = ControlPlane::shared().await;
//! let ns = TestNamespace::new(cp, "rollout").await?;
//! let deployments = ns.api::<Deployment>(cp.client());
//! // ... create a Deployment named "web" ...
//! wait::wait_for(&deployments, "web", std::time::Duration::from_secs(60), wait::deployment_ready(2)).await?;
//! # Ok(()) }
//! ```

pub mod bins;
pub mod control_plane;
pub mod fleet;
pub mod http;
pub mod image;
pub mod local;
pub mod namespace;
pub mod node_agent;
pub mod pki;
pub mod pod_network;
pub mod postgres;
pub mod proc_stats;
pub mod process;
pub mod prom_tools;
pub mod prometheus;
pub mod router;
pub mod status_check;
pub mod tokens;
pub mod wait;

pub use bins::K8S_VERSION;
pub use control_plane::{ControlPlane, ControlPlaneOptions};
pub use local::{LocalCluster, connect_or_start};
pub use namespace::TestNamespace;
pub use node_agent::{AgentNode, NodeAgent};
pub use postgres::Postgres;
pub use wait::{WaitError, wait_for, wait_for_deletion, wait_until};

/// Reports progress straight to the process's stderr. `eprintln!` inside a test is
/// captured and shown only on failure; a minutes-long build or the control
/// plane's start time should be visible as it happens.
pub(crate) fn progress(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "chatgate-tests: {message}");
}
