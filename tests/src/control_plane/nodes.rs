//! The fake nodes kwok manages, and when a node can take Pods.

use super::*;

/// A node for kwok to manage: annotated so kwok picks it up, labelled for
/// selectors, with room for plenty of pods.
pub(super) fn fake_node(name: &str) -> Node {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {
                KWOK_NODE_ANNOTATION: KWOK_NODE_ANNOTATION_VALUE,
                "node.alpha.kubernetes.io/ttl": "0",
            },
            "labels": {
                KWOK_NODE_LABEL.0: KWOK_NODE_LABEL.1,
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
            },
        },
        "status": {
            "allocatable": { "cpu": "32", "memory": "256Gi", "pods": "110" },
            "capacity": { "cpu": "32", "memory": "256Gi", "pods": "110" },
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": format!("v{K8S_VERSION}-kwok"),
                "kubeProxyVersion": "",
                "bootID": "", "containerRuntimeVersion": "", "kernelVersion": "",
                "machineID": "", "osImage": "", "systemUUID": "",
            },
        },
    }))
    .expect("a valid Node")
}

/// Ready, and without the NoSchedule taints a node carries until the node
/// controller has seen it Ready — so the scheduler will place pods on it.
pub(super) fn node_schedulable(node: &Node) -> bool {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|ts| ts.iter().any(|t| t.effect == "NoSchedule"));
    ready && !tainted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fake_node_is_kwok_managed_and_schedulable_only_when_ready_and_untainted() {
        let mut node = fake_node("n");
        let annotations = node.metadata.annotations.clone().unwrap();
        assert_eq!(
            annotations[KWOK_NODE_ANNOTATION],
            KWOK_NODE_ANNOTATION_VALUE
        );
        assert_eq!(node.metadata.labels.clone().unwrap()["type"], "kwok");
        assert!(!node_schedulable(&node), "no Ready condition yet");

        node.status.as_mut().unwrap().conditions = Some(vec![
            serde_json::from_value(serde_json::json!({ "type": "Ready", "status": "True" }))
                .unwrap(),
        ]);
        node.spec = Some(
            serde_json::from_value(serde_json::json!({
                "taints": [{ "key": "node.kubernetes.io/not-ready", "effect": "NoSchedule" }],
            }))
            .unwrap(),
        );
        assert!(!node_schedulable(&node), "still tainted");

        node.spec = None;
        assert!(node_schedulable(&node));
    }
}
