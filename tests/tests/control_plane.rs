//! Proofs that the test control plane is a real one: kube-controller-manager,
//! kube-scheduler and kwok run Deployments to Ready Pods; RBAC, PodSecurity
//! admission and CEL validation reject what they should, with their own messages;
//! the garbage collector removes dependents; and no process outlives its owner.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use chatgate_tests::wait::{deployment_ready, pod_ready};
use chatgate_tests::{
    ControlPlane, K8S_VERSION, TestNamespace, wait_for, wait_for_deletion, wait_until,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams,
};
use kube::core::Status;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("a valid object literal")
}

/// The API's error response, or a panic naming what was expected instead.
fn api_error<T: std::fmt::Debug>(result: kube::Result<T>, expected: &str) -> Status {
    match result {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("expected {expected}, got {other:?}"),
    }
}

#[tokio::test]
async fn api_server_and_kubectl_report_the_built_kubernetes_version() {
    let cp = ControlPlane::shared().await;
    let info = cp.client().apiserver_version().await.expect("/version");
    assert_eq!(info.git_version, format!("v{K8S_VERSION}"));
    assert_eq!(info.minor, K8S_VERSION.split('.').nth(1).unwrap());

    let out = cp
        .kubectl()
        .args(["version", "--client", "-o", "json"])
        .output()
        .expect("running kubectl");
    let client: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("kubectl version JSON");
    assert_eq!(
        client["clientVersion"]["gitVersion"],
        format!("v{K8S_VERSION}")
    );
}

#[tokio::test]
async fn kubectl_and_helm_reach_the_cluster_through_the_shared_kubeconfig() {
    let cp = ControlPlane::shared().await;
    let nodes = cp
        .kubectl()
        .args(["get", "nodes", "-l", "type=kwok", "-o", "name"])
        .output()
        .expect("running kubectl");
    assert!(nodes.status.success(), "{nodes:?}");
    let listed = String::from_utf8(nodes.stdout).unwrap();
    for node in cp.fake_nodes() {
        assert!(listed.contains(&format!("node/{node}")), "{listed}");
    }

    let releases = cp
        .helm()
        .args(["list", "--all-namespaces", "-o", "json"])
        .output()
        .expect("running helm");
    assert!(releases.status.success(), "{releases:?}");
    assert_eq!(String::from_utf8_lossy(&releases.stdout).trim(), "[]");
}

#[tokio::test]
async fn deployment_pods_become_running_and_ready_on_kwok_nodes() {
    let cp = ControlPlane::shared().await;
    let ns = TestNamespace::new(cp, "deploy").await.unwrap();
    let deployments: Api<Deployment> = ns.api(cp.client());
    let deployment: Deployment = from_json(json!({
        "metadata": { "name": "web" },
        "spec": {
            "replicas": 2,
            "selector": { "matchLabels": { "app": "web" } },
            "template": {
                "metadata": { "labels": { "app": "web" } },
                "spec": {
                    "nodeSelector": { "type": "kwok" },
                    // Never pulled: kwok plays the kubelet.
                    "containers": [{ "name": "web", "image": "registry.invalid/web:1" }],
                },
            },
        },
    }));
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();

    let ready = wait_for(&deployments, "web", TIMEOUT, deployment_ready(2))
        .await
        .unwrap();
    assert_eq!(ready.status.unwrap().ready_replicas, Some(2));

    let pods: Api<Pod> = ns.api(cp.client());
    let pods = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    assert_eq!(pods.items.len(), 2);
    for pod in &pods.items {
        let status = pod.status.as_ref().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"), "{pod:?}");
        assert!(pod_ready(pod), "{pod:?}");
        let node = pod.spec.as_ref().unwrap().node_name.clone().unwrap();
        assert!(cp.fake_nodes().contains(&node), "scheduled to {node}");
    }
}

#[tokio::test]
async fn rbac_denies_a_user_without_bindings_and_admits_one_bound_by_group() {
    let cp = ControlPlane::shared().await;
    let ns = TestNamespace::new(cp, "rbac-user").await.unwrap();

    let stranger = cp.client_as("stranger", &[]).unwrap();
    let denied = api_error(
        Api::<ConfigMap>::namespaced(stranger, ns.name())
            .list(&ListParams::default())
            .await,
        "403 for a user without bindings",
    );
    assert_eq!(denied.code, 403, "{denied:?}");
    assert!(
        denied
            .message
            .contains("User \"stranger\" cannot list resource \"configmaps\""),
        "{denied:?}"
    );

    // A binding to a group reaches a user whose certificate names that group.
    let roles: Api<Role> = ns.api(cp.client());
    roles
        .create(&PostParams::default(), &configmap_reader_role())
        .await
        .unwrap();
    let bindings: Api<RoleBinding> = ns.api(cp.client());
    bindings
        .create(
            &PostParams::default(),
            &from_json(json!({
                "metadata": { "name": "viewers-read-configmaps" },
                "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "configmap-reader" },
                "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "chatgate-viewers" }],
            })),
        )
        .await
        .unwrap();
    let viewer = cp.client_as("viewer", &["chatgate-viewers"]).unwrap();
    let viewer_configmaps = Api::<ConfigMap>::namespaced(viewer, ns.name());
    // RBAC's authorizer cache follows the binding within moments; wait for it.
    wait_until(TIMEOUT, "the group binding to take effect", || {
        let api = viewer_configmaps.clone();
        async move { Ok(api.list(&ListParams::default()).await.ok().map(|_| ())) }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn impersonated_service_account_gets_exactly_what_its_role_grants() {
    let cp = ControlPlane::shared().await;
    let ns = TestNamespace::new(cp, "rbac-sa").await.unwrap();
    grant_configmap_reader(cp, &ns, "reader").await.unwrap();
    let existing: ConfigMap =
        from_json(json!({ "metadata": { "name": "settings" }, "data": { "k": "v" } }));
    ns.api::<ConfigMap>(cp.client())
        .create(&PostParams::default(), &existing)
        .await
        .unwrap();

    let sa = cp.client_as_service_account(ns.name(), "reader");
    assert_role_is_exactly_configmap_reading(sa, &ns).await;
}

#[tokio::test]
async fn service_account_token_from_token_request_gets_exactly_what_its_role_grants() {
    let cp = ControlPlane::shared().await;
    let ns = TestNamespace::new(cp, "rbac-token").await.unwrap();
    grant_configmap_reader(cp, &ns, "reader").await.unwrap();
    let existing: ConfigMap =
        from_json(json!({ "metadata": { "name": "settings" }, "data": { "k": "v" } }));
    ns.api::<ConfigMap>(cp.client())
        .create(&PostParams::default(), &existing)
        .await
        .unwrap();

    let token = cp.service_account_token(ns.name(), "reader").await.unwrap();
    let sa = cp.client_with_token(&token).unwrap();
    assert_role_is_exactly_configmap_reading(sa, &ns).await;
}

fn configmap_reader_role() -> Role {
    from_json(json!({
        "metadata": { "name": "configmap-reader" },
        "rules": [{ "apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"] }],
    }))
}

async fn grant_configmap_reader(
    cp: &ControlPlane,
    ns: &TestNamespace,
    account: &str,
) -> Result<()> {
    let client = cp.client();
    ns.api::<ServiceAccount>(client.clone())
        .create(
            &PostParams::default(),
            &from_json(json!({ "metadata": { "name": account } })),
        )
        .await?;
    ns.api::<Role>(client.clone())
        .create(&PostParams::default(), &configmap_reader_role())
        .await?;
    ns.api::<RoleBinding>(client)
        .create(
            &PostParams::default(),
            &from_json(json!({
                "metadata": { "name": format!("{account}-reads-configmaps") },
                "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "configmap-reader" },
                "subjects": [{ "kind": "ServiceAccount", "name": account, "namespace": ns.name() }],
            })),
        )
        .await
        .context("binding the role")?;
    Ok(())
}

/// get/list on ConfigMaps in its namespace: allowed. Anything else: 403.
async fn assert_role_is_exactly_configmap_reading(sa: kube::Client, ns: &TestNamespace) {
    let configmaps: Api<ConfigMap> = Api::namespaced(sa.clone(), ns.name());
    let allowed = wait_until(
        TIMEOUT,
        "the service account's binding to take effect",
        || {
            let api = configmaps.clone();
            async move { Ok(api.list(&ListParams::default()).await.ok()) }
        },
    )
    .await
    .unwrap();
    let names: Vec<_> = allowed
        .items
        .iter()
        .filter_map(|c| c.metadata.name.as_deref())
        .collect();
    assert!(names.contains(&"settings"), "{names:?}");
    assert_eq!(
        configmaps.get("settings").await.unwrap().data.unwrap()["k"],
        "v"
    );

    let create = api_error(
        configmaps
            .create(
                &PostParams::default(),
                &from_json(json!({ "metadata": { "name": "new" } })),
            )
            .await,
        "403 for create",
    );
    assert_eq!(create.code, 403, "{create:?}");
    assert!(
        create
            .message
            .contains("cannot create resource \"configmaps\""),
        "{create:?}"
    );

    let delete = api_error(
        configmaps
            .delete("settings", &DeleteParams::default())
            .await,
        "403 for delete",
    );
    assert_eq!(delete.code, 403, "{delete:?}");

    let secrets = api_error(
        Api::<Secret>::namespaced(sa.clone(), ns.name())
            .list(&ListParams::default())
            .await,
        "403 for secrets",
    );
    assert_eq!(secrets.code, 403, "{secrets:?}");

    let elsewhere = api_error(
        Api::<ConfigMap>::namespaced(sa, "default")
            .list(&ListParams::default())
            .await,
        "403 in another namespace",
    );
    assert_eq!(elsewhere.code, 403, "{elsewhere:?}");
}

#[tokio::test]
async fn restricted_namespace_rejects_a_privileged_pod_with_the_admission_message() {
    let cp = ControlPlane::shared().await;
    let ns = TestNamespace::with_labels(
        cp,
        "psa",
        &[("pod-security.kubernetes.io/enforce", "restricted")],
    )
    .await
    .unwrap();
    let pods: Api<Pod> = ns.api(cp.client());

    let privileged: Pod = from_json(json!({
        "metadata": { "name": "privileged" },
        "spec": { "containers": [{
            "name": "c", "image": "registry.invalid/c:1",
            "securityContext": { "privileged": true },
        }]},
    }));
    let rejected = api_error(
        pods.create(&PostParams::default(), &privileged).await,
        "a PodSecurity rejection",
    );
    assert_eq!(rejected.code, 403, "{rejected:?}");
    assert!(
        rejected
            .message
            .contains("violates PodSecurity \"restricted:latest\": privileged (container \"c\" must not set securityContext.privileged=true)"),
        "{}",
        rejected.message
    );

    // The same namespace admits a pod that meets the restricted profile.
    let compliant: Pod = from_json(json!({
        "metadata": { "name": "compliant" },
        "spec": {
            "securityContext": { "runAsNonRoot": true, "runAsUser": 1000, "seccompProfile": { "type": "RuntimeDefault" } },
            "containers": [{
                "name": "c", "image": "registry.invalid/c:1",
                "securityContext": { "allowPrivilegeEscalation": false, "capabilities": { "drop": ["ALL"] } },
            }],
        },
    }));
    pods.create(&PostParams::default(), &compliant)
        .await
        .unwrap();
}

#[tokio::test]
async fn crd_cel_rule_rejects_an_invalid_object_with_the_rule_message() {
    let cp = ControlPlane::shared().await;
    let ns = TestNamespace::new(cp, "cel").await.unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(cp.client());
    let crd: CustomResourceDefinition = from_json(json!({
        "metadata": { "name": "ranges.cel.test.chatgate.dev" },
        "spec": {
            "group": "cel.test.chatgate.dev",
            "names": { "kind": "Range", "plural": "ranges", "singular": "range" },
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": { "openAPIV3Schema": {
                    "type": "object",
                    "properties": { "spec": {
                        "type": "object",
                        "required": ["min", "max"],
                        "properties": { "min": { "type": "integer" }, "max": { "type": "integer" } },
                        "x-kubernetes-validations": [{
                            "rule": "self.min <= self.max",
                            "message": "min must not be greater than max",
                        }],
                    }},
                }},
            }],
        },
    }));
    crds.create(&PostParams::default(), &crd).await.unwrap();
    wait_for(&crds, "ranges.cel.test.chatgate.dev", TIMEOUT, |crd| {
        crd.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            })
    })
    .await
    .unwrap();

    let gvk = GroupVersionKind::gvk("cel.test.chatgate.dev", "v1", "Range");
    let ranges: Api<DynamicObject> = Api::namespaced_with(
        cp.client(),
        ns.name(),
        &ApiResource::from_gvk_with_plural(&gvk, "ranges"),
    );
    let range = |name: &str, min: i64, max: i64| -> DynamicObject {
        from_json(json!({
            "apiVersion": "cel.test.chatgate.dev/v1", "kind": "Range",
            "metadata": { "name": name },
            "spec": { "min": min, "max": max },
        }))
    };

    let rejected = api_error(
        ranges
            .create(&PostParams::default(), &range("inverted", 5, 1))
            .await,
        "a CEL rejection",
    );
    assert_eq!(rejected.code, 422, "{rejected:?}");
    assert!(
        rejected
            .message
            .contains("spec: Invalid value: min must not be greater than max"),
        "{}",
        rejected.message
    );
    ranges
        .create(&PostParams::default(), &range("ordered", 1, 5))
        .await
        .unwrap();

    crds.delete("ranges.cel.test.chatgate.dev", &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn deleting_an_owner_garbage_collects_its_dependents() {
    let cp = ControlPlane::shared().await;
    let ns = TestNamespace::new(cp, "gc").await.unwrap();
    let configmaps: Api<ConfigMap> = ns.api(cp.client());
    let secrets: Api<Secret> = ns.api(cp.client());

    let owner = configmaps
        .create(
            &PostParams::default(),
            &from_json(json!({ "metadata": { "name": "owner" } })),
        )
        .await
        .unwrap();
    let owner_ref = json!([{
        "apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
        "uid": owner.metadata.uid.clone().unwrap(),
    }]);
    configmaps
        .create(
            &PostParams::default(),
            &from_json(
                json!({ "metadata": { "name": "dependent", "ownerReferences": owner_ref } }),
            ),
        )
        .await
        .unwrap();
    secrets
        .create(
            &PostParams::default(),
            &from_json(
                json!({ "metadata": { "name": "dependent", "ownerReferences": owner_ref } }),
            ),
        )
        .await
        .unwrap();
    let unrelated = configmaps
        .create(
            &PostParams::default(),
            &from_json(json!({ "metadata": { "name": "unrelated" } })),
        )
        .await
        .unwrap();

    configmaps
        .delete("owner", &DeleteParams::background())
        .await
        .unwrap();

    wait_for_deletion(&configmaps, "dependent", TIMEOUT)
        .await
        .unwrap();
    wait_for_deletion(&secrets, "dependent", TIMEOUT)
        .await
        .unwrap();
    let still_there = configmaps.get("unrelated").await.unwrap();
    assert_eq!(still_there.metadata.uid, unrelated.metadata.uid);
}

#[tokio::test]
async fn deleting_a_deployment_in_the_foreground_removes_its_replicasets_and_pods_first() {
    use k8s_openapi::api::apps::v1::ReplicaSet;
    let cp = ControlPlane::shared().await;
    let ns = TestNamespace::new(cp, "gc-deploy").await.unwrap();
    let deployments: Api<Deployment> = ns.api(cp.client());
    let labels: BTreeMap<&str, &str> = [("app", "gc")].into();
    let deployment: Deployment = from_json(json!({
        "metadata": { "name": "gc" },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": labels },
            "template": {
                "metadata": { "labels": labels },
                "spec": { "containers": [{ "name": "c", "image": "registry.invalid/c:1" }] },
            },
        },
    }));
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    wait_for(&deployments, "gc", TIMEOUT, deployment_ready(1))
        .await
        .unwrap();

    deployments
        .delete("gc", &DeleteParams::foreground())
        .await
        .unwrap();
    wait_for_deletion(&deployments, "gc", TIMEOUT)
        .await
        .unwrap();
    // Foreground deletion removes the Deployment only after its dependents.
    let replicasets: Api<ReplicaSet> = ns.api(cp.client());
    assert!(
        replicasets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let pods: Api<Pod> = ns.api(cp.client());
    assert!(
        pods.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

/// The child processes of `pid` that are still alive (not exited, not zombies).
fn live_children(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command name: state, ppid, ...
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let (state, ppid) = (
            fields.next(),
            fields.next().and_then(|p| p.parse::<u32>().ok()),
        );
        if ppid == Some(pid) && state != Some("Z") {
            children.push(child);
        }
    }
    children
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(") ").map(|(_, r)| r.starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

/// Starts `chatgate-cluster` and returns it once it printed its export line,
/// with the pids of the processes it started and its kubeconfig path.
async fn start_cluster_binary() -> (tokio::process::Child, Vec<u32>, std::path::PathBuf) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_chatgate-cluster"))
        .args(["--nodes", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starting chatgate-cluster");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(180), lines.next_line())
        .await
        .expect("chatgate-cluster printed its export line in time")
        .unwrap()
        .expect("an export line");
    let kubeconfig = line
        .strip_prefix("export KUBECONFIG=")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    let pid = child.id().unwrap();
    let children = live_children(pid);
    assert_eq!(
        children.len(),
        5,
        "etcd, apiserver, controller-manager, scheduler, kwok: {children:?}"
    );
    (child, children, kubeconfig.into())
}

#[tokio::test]
async fn ctrl_c_on_the_cluster_command_stops_every_process_and_removes_its_files() {
    let (mut cluster, children, kubeconfig) = start_cluster_binary().await;
    assert!(kubeconfig.exists());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(cluster.id().unwrap() as i32, libc::SIGINT) };
    let status = tokio::time::timeout(TIMEOUT, cluster.wait())
        .await
        .expect("chatgate-cluster exits after Ctrl-C")
        .unwrap();
    assert!(status.success(), "{status}");
    let left: Vec<u32> = children.into_iter().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "still running after Ctrl-C: {left:?}");
    assert!(
        !kubeconfig.exists(),
        "{} was left behind",
        kubeconfig.display()
    );
}

#[tokio::test]
async fn killing_the_cluster_command_outright_leaves_no_orphans() {
    let (mut cluster, children, kubeconfig) = start_cluster_binary().await;
    cluster.start_kill().unwrap();
    cluster.wait().await.unwrap();
    // PR_SET_PDEATHSIG delivers SIGKILL to each child as its parent dies.
    wait_until(
        Duration::from_secs(10),
        "the orphaned processes to die",
        || {
            let left: Vec<u32> = children.iter().copied().filter(|p| alive(*p)).collect();
            async move { Ok(left.is_empty().then_some(())) }
        },
    )
    .await
    .unwrap();
    // A process killed outright cannot remove its files; the next start would
    // (it removes directories of dead runs). Tidy up here instead.
    let _ = std::fs::remove_dir_all(kubeconfig.parent().unwrap());
}

#[tokio::test]
async fn ctrl_c_while_the_cluster_is_starting_stops_what_had_started() {
    let mut cluster = tokio::process::Command::new(env!("CARGO_BIN_EXE_chatgate-cluster"))
        .args(["--nodes", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starting chatgate-cluster");
    let pid = cluster.id().unwrap();
    // Interrupt as soon as the first process (etcd) runs.
    let started = wait_until(TIMEOUT, "chatgate-cluster to start etcd", || {
        let children = live_children(pid);
        async move { Ok((!children.is_empty()).then_some(children)) }
    })
    .await
    .unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let status = tokio::time::timeout(TIMEOUT, cluster.wait())
        .await
        .expect("chatgate-cluster exits after Ctrl-C")
        .unwrap();
    assert_eq!(status.code(), Some(130), "{status}");
    let left: Vec<u32> = started.into_iter().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "still running after Ctrl-C: {left:?}");
    let prefix = format!("chatgate-cp-{pid}-");
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}
