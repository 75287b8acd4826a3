//! The Helm chart: it lints and renders cleanly, carries the same generated CRD as
//! `crds/`, and installs on the real control plane into a namespace enforcing the
//! `restricted` Pod Security profile, where Helm 4 waits for it with kstatus; its
//! permissions are listed and hold no wildcard; installed for chosen namespaces it
//! grants nothing cluster-wide, and the operator works with exactly that.

mod operator_support;

use std::collections::BTreeSet;

use anyhow::Result;
use chatgate_operator::crd::ChatService;
use chatgate_tests::process::run_ok;
use chatgate_tests::{ControlPlane, TestNamespace, wait_for};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ListParams};
use operator_support::*;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/chatgate-operator");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_lints_renders_and_installs_under_restricted_pod_security() -> Result<()> {
    let cp = ControlPlane::shared().await;

    let mut lint = cp.helm();
    lint.args(["lint", "--strict", CHART]);
    run_ok(lint);

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
    let rendered = run_ok(template);
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
    run_ok(install);
    let mut status = cp.helm();
    status.args(["status", &release, "--namespace", ns.name()]);
    assert!(run_ok(status).contains("deployed"));
    let mut uninstall = cp.helm();
    uninstall.args(["uninstall", &release, "--namespace", ns.name(), "--wait"]);
    run_ok(uninstall);
    Ok(())
}

/// One permission the chart grants: (scope, apiGroup, resource, verb).
type Grant = (String, String, String, String);

/// Every permission in the chart's rendered RBAC, by where it applies ("cluster" for a
/// ClusterRole, else the Role's namespace).
fn grants(rendered: &str) -> (BTreeSet<Grant>, BTreeSet<String>) {
    use serde::Deserialize;
    let mut out = BTreeSet::new();
    let mut kinds = BTreeSet::new();
    for doc in serde_norway::Deserializer::from_str(rendered) {
        let Ok(v) = serde_json::Value::deserialize(doc) else {
            continue;
        };
        let kind = v["kind"].as_str().unwrap_or_default().to_owned();
        kinds.insert(kind.clone());
        let scope = match kind.as_str() {
            "ClusterRole" => "cluster".to_owned(),
            "Role" => v["metadata"]["namespace"]
                .as_str()
                .unwrap_or("?")
                .to_owned(),
            _ => continue,
        };
        for rule in v["rules"].as_array().into_iter().flatten() {
            let list = |k: &str| -> Vec<String> {
                rule[k]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            };
            assert!(
                rule.get("nonResourceURLs").is_none() && rule.get("resourceNames").is_none(),
                "unexpected rule {rule}"
            );
            for group in list("apiGroups") {
                for resource in list("resources") {
                    for verb in list("verbs") {
                        out.insert((scope.clone(), group.clone(), resource.clone(), verb));
                    }
                }
            }
        }
    }
    (out, kinds)
}

fn render_rbac(cp: &ControlPlane, values: &[&str]) -> String {
    let mut template = cp.helm();
    template
        .args(["template", "chatgate", CHART, "--namespace", "ops"])
        .args(values.iter().flat_map(|v| ["--set-string", v]))
        .args(["--show-only", "templates/rbac.yaml"]);
    run_ok(template)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_permissions_are_listed_and_hold_no_wildcard() -> Result<()> {
    let cp = ControlPlane::shared().await;
    let namespaced = ["", "chatgate.dev", "apps", "policy", "events.k8s.io"];
    for (values, scoped) in [
        (&[][..], None),
        (&["watchNamespace=team-a"][..], Some(vec!["team-a"])),
        (
            &["watchNamespace=team-a\\, team-b"][..],
            Some(vec!["team-a", "team-b"]),
        ),
    ] {
        let rendered = render_rbac(cp, values);
        let (grants, kinds) = grants(&rendered);
        eprintln!("effective permissions with {values:?}:");
        for (scope, group, resource, verb) in &grants {
            eprintln!("  {scope:10} {group:16} {resource:22} {verb}");
            for part in [group, resource, verb] {
                assert!(
                    !part.contains('*'),
                    "wildcard in {scope} {group} {resource} {verb}"
                );
            }
            assert!(namespaced.contains(&group.as_str()) || group == "coordination.k8s.io");
        }
        // The operator never writes a Secret, never deletes what it does not own.
        assert!(
            !grants
                .iter()
                .any(|(_, _, r, v)| r == "secrets"
                    && !["get", "list", "watch"].contains(&v.as_str())),
            "{grants:?}"
        );
        match scoped {
            None => assert!(kinds.contains("ClusterRole") && kinds.contains("ClusterRoleBinding")),
            Some(namespaces) => {
                assert!(
                    !kinds.contains("ClusterRole") && !kinds.contains("ClusterRoleBinding"),
                    "a namespace-scoped install grants nothing cluster-wide: {kinds:?}"
                );
                let scopes: BTreeSet<&str> = grants.iter().map(|g| g.0.as_str()).collect();
                let mut want: BTreeSet<&str> = namespaces.into_iter().collect();
                want.insert("ops"); // the leader-election Lease
                assert_eq!(scopes, want);
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_to_two_namespaces_the_operator_works_with_no_cluster_wide_permission() -> Result<()>
{
    let cp = ControlPlane::shared().await;
    install_crd(cp).await?;
    let ops = TestNamespace::new(cp, "scoped-ops").await?;
    let team_a = TestNamespace::new(cp, "scoped-a").await?;
    let team_b = TestNamespace::new(cp, "scoped-b").await?;
    let elsewhere = TestNamespace::new(cp, "scoped-x").await?;
    let watched = format!("{},{}", team_a.name(), team_b.name());
    let rendered = install_chart_rbac_with(
        cp,
        ops.name(),
        &[&format!("watchNamespace={}", watched.replace(',', "\\,"))],
    )?;
    assert!(!rendered.contains("kind: ClusterRole"), "{rendered}");

    // The ServiceAccount's own token, from the TokenRequest API: RBAC sees exactly it.
    let token = cp.service_account_token(ops.name(), OPERATOR_SA).await?;
    let operator_client = cp.client_with_token(&token)?;
    let forbidden = |e: kube::Error| matches!(e, kube::Error::Api(ref a) if a.code == 403);
    // Nothing cluster-wide: not ChatServices, Secrets or Deployments of every
    // namespace, not even the list of namespaces; nothing in an unwatched namespace.
    chatgate_tests::wait_until(TIMEOUT, "the chart's Roles to take effect", || {
        let c = operator_client.clone();
        let ns = team_a.name().to_owned();
        async move {
            Ok(Api::<ChatService>::namespaced(c, &ns)
                .list(&ListParams::default())
                .await
                .ok()
                .map(|_| ()))
        }
    })
    .await?;
    let all_cs: Api<ChatService> = Api::all(operator_client.clone());
    assert!(forbidden(
        all_cs.list(&ListParams::default()).await.unwrap_err()
    ));
    let all_secrets: Api<Secret> = Api::all(operator_client.clone());
    assert!(forbidden(
        all_secrets.list(&ListParams::default()).await.unwrap_err()
    ));
    let all_deployments: Api<Deployment> = Api::all(operator_client.clone());
    assert!(forbidden(
        all_deployments
            .list(&ListParams::default())
            .await
            .unwrap_err()
    ));
    let namespaces: Api<Namespace> = Api::all(operator_client.clone());
    assert!(forbidden(
        namespaces.list(&ListParams::default()).await.unwrap_err()
    ));
    let other: Api<Secret> = elsewhere.api(operator_client.clone());
    assert!(forbidden(
        other.list(&ListParams::default()).await.unwrap_err()
    ));

    let mut opts = options(&watched, "scoped");
    opts.lease_namespace = Some(ops.name().to_owned());
    let mut op = Operator::start_with(operator_client, opts);
    op.wait_leading(TIMEOUT).await?;

    let admin = cp.client();
    for ns in [&team_a, &team_b, &elsewhere] {
        create(
            &admin,
            ns.name(),
            &ChatService::test("chat").replicas(1).build(),
        )
        .await?;
    }
    for ns in [&team_a, &team_b] {
        let api: Api<ChatService> = ns.api(admin.clone());
        wait_for(&api, "chat", TIMEOUT, ready_now).await?;
        let deployments: Api<Deployment> = ns.api(admin.clone());
        assert!(deployments.get_opt("chat").await?.is_some());
    }
    // The unwatched namespace is left alone: its status is the API server's default.
    let api: Api<ChatService> = elsewhere.api(admin.clone());
    let untouched = api.get("chat").await?.status.unwrap_or_default();
    assert!(
        untouched.conditions.is_empty() && untouched.observed_generation.unwrap_or(0) == 0,
        "{untouched:?}"
    );
    let deployments: Api<Deployment> = elsewhere.api(admin.clone());
    assert!(deployments.get_opt("chat").await?.is_none());
    op.stop().await;
    Ok(())
}
