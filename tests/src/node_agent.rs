//! Extension point, not yet implemented: a test-side node agent that plays kubelet
//! for Pods bound to a node kwok does not manage, running the real service binary
//! on loopback and executing the Pods' probes, so the readiness gate can be proven
//! end to end.
//!
//! How it is meant to plug in:
//! 1. [`AgentNode::node`] is created in the cluster. It lacks kwok's annotation, so
//!    kwok leaves it alone, and carries a `NoSchedule` taint, so only Pods that
//!    tolerate it (the ones a test means for the agent) land there.
//! 2. The agent watches Pods with `spec.nodeName` equal to its node, starts each
//!    container's command as a local process (via
//!    [`crate::process::ManagedProcess`], so it dies with the test) with its
//!    ports remapped to free loopback ports, and runs the startup, readiness and
//!    liveness probes against `127.0.0.1` only.
//! 3. It writes Pod status (phase, container states, `Ready`, termination messages
//!    read from the process's termination-message file) and renews the node's Lease.
//!
//! Nothing here dials a Pod or cluster IP; those stay status only.

use std::future::Future;
use std::pin::Pin;

use k8s_openapi::api::core::v1::Node;

use crate::control_plane::ControlPlane;

/// The taint that keeps ordinary Pods off an agent node.
pub const AGENT_NODE_TAINT_KEY: &str = "chatgate.dev/node-agent";

/// A node whose kubelet is a [`NodeAgent`] rather than kwok.
#[derive(Clone, Debug)]
pub struct AgentNode {
    pub name: String,
}

impl AgentNode {
    /// The Node object to create for the agent: no kwok annotation, tainted so
    /// only tolerating Pods are scheduled to it.
    pub fn node(&self) -> Node {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {
                    "type": "node-agent",
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                },
            },
            "spec": {
                "taints": [{ "key": AGENT_NODE_TAINT_KEY, "value": "true", "effect": "NoSchedule" }],
            },
        }))
        .expect("a valid Node")
    }
}

/// What a future node agent implements. `run` serves the node until `shutdown`
/// completes; it owns every process it starts and stops them before returning.
pub trait NodeAgent: Send + Sync {
    fn node(&self) -> &AgentNode;

    fn run<'a>(
        &'a self,
        control_plane: &'a ControlPlane,
        shutdown: Pin<Box<dyn Future<Output = ()> + Send + 'a>>,
    ) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>>;
}
