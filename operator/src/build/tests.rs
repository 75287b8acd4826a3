//! The gate's wiring, proven on the built objects.

use super::*;
use crate::configuration::declared_config;
use chatgate_contract::Environment;
use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

fn built(cs: &ChatService) -> Desired {
    let (_, problems) = declared_config(&cs.spec, None);
    assert!(problems.is_empty(), "{problems:?}");
    build(cs, &ValidatedSpec::declared(cs, None).0)
}

fn default_cs() -> ChatService {
    ChatService::test("chat")
        .namespace("team")
        .stored("uid-1", 3)
        .build()
}

fn pod_spec(d: &Desired) -> &PodSpec {
    d.deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
}

fn container(d: &Desired) -> &Container {
    &pod_spec(d).containers[0]
}

#[test]
fn startup_probe_budget_is_failure_threshold_times_period() {
    for (budget, period) in [(60, 2), (30, 5), (3600, 60), (5, 1), (90, 4)] {
        let d = built(&ChatService::test("c").startup(budget, period).build());
        let p = container(&d).startup_probe.as_ref().unwrap();
        let get = p.http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some("/health/startup"));
        assert_eq!(get.port, IntOrString::String("http".into()));
        assert_eq!(p.period_seconds, Some(period));
        let total = p.failure_threshold.unwrap() * p.period_seconds.unwrap();
        if budget % period == 0 {
            assert_eq!(total, budget, "budget {budget} period {period}");
        } else {
            // Only reachable without admission (offline render): never shorter.
            assert!(total >= budget && total < budget + period);
        }
    }
}

#[test]
fn readiness_and_liveness_use_their_own_endpoints() {
    let d = built(&default_cs());
    let c = container(&d);
    let ready = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(ready.path.as_deref(), Some("/health/ready"));
    let live = c
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(live.path.as_deref(), Some("/health/live"));
    assert_eq!(c.ports.as_ref().unwrap()[0].container_port, 8080);
    assert_eq!(c.ports.as_ref().unwrap()[0].name.as_deref(), Some("http"));
}

#[test]
fn termination_message_is_read_from_the_file_or_the_logs() {
    let d = built(&default_cs());
    let c = container(&d);
    assert_eq!(
        c.termination_message_path.as_deref(),
        Some("/dev/termination-log")
    );
    assert_eq!(
        c.termination_message_policy.as_deref(),
        Some("FallbackToLogsOnError")
    );
    let data = d.config_map.data.as_ref().unwrap();
    assert_eq!(data["CHATGATE_TERMINATION_LOG"], "/dev/termination-log");
    assert_eq!(data["CHATGATE_LISTEN"], "0.0.0.0:8080");
    assert_eq!(data["CHATGATE_LOG_FORMAT"], "json");
}

#[test]
fn spec_log_format_wins_over_the_default() {
    let d = built(
        &ChatService::test("c")
            .config("CHATGATE_LOG_FORMAT", "text")
            .build(),
    );
    assert_eq!(
        d.config_map.data.as_ref().unwrap()["CHATGATE_LOG_FORMAT"],
        "text"
    );
}

#[test]
fn pre_stop_sleeps_and_grace_covers_drain_and_margin() {
    for drain in [0, 5, 30, 600] {
        let d = built(&ChatService::test("c").drain_seconds(drain).build());
        let sleep = container(&d)
            .lifecycle
            .as_ref()
            .unwrap()
            .pre_stop
            .as_ref()
            .unwrap()
            .sleep
            .as_ref()
            .unwrap()
            .seconds;
        assert_eq!(sleep, i64::from(PRE_STOP_SECONDS));
        let grace = pod_spec(&d).termination_grace_period_seconds.unwrap();
        assert!(grace >= i64::from(PRE_STOP_SECONDS + drain + GRACE_MARGIN_SECONDS));
        assert_eq!(
            d.config_map.data.as_ref().unwrap()["CHATGATE_DRAIN_SECONDS"],
            drain.to_string()
        );
    }
}

#[test]
fn rolling_update_never_removes_a_ready_pod_first() {
    let d = built(&ChatService::test("c").max_surge(3).build());
    let spec = d.deployment.spec.as_ref().unwrap();
    let strategy = spec.strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let ru = strategy.rolling_update.as_ref().unwrap();
    assert_eq!(ru.max_unavailable, Some(IntOrString::Int(0)));
    assert_eq!(ru.max_surge, Some(IntOrString::Int(3)));
    assert_eq!(spec.progress_deadline_seconds, Some(600));
}

#[test]
fn pods_meet_the_restricted_pod_security_profile() {
    let d = built(&default_cs());
    let pod = pod_spec(&d);
    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(
        psc.seccomp_profile.as_ref().unwrap().type_,
        "RuntimeDefault"
    );
    let sc = container(&d).security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert!(sc.run_as_user.unwrap() > 0);
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_owned()][..])
    );
    assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    // A writable /tmp on a read-only root.
    let mount = &container(&d).volume_mounts.as_ref().unwrap()[0];
    assert_eq!(mount.mount_path, "/tmp");
    let volume = &pod.volumes.as_ref().unwrap()[0];
    assert_eq!(volume.name, mount.name);
    assert!(volume.empty_dir.is_some());
    assert_eq!(pod.automount_service_account_token, Some(false));
}

#[test]
fn literals_go_to_the_config_map_and_secrets_stay_references() {
    let cs = ChatService::test("chat")
        .in_env(Environment::Staging)
        .with_secret("chat-secrets")
        .with_llm_key("llm", "api-key")
        .build();
    let d = built(&cs);
    let data = d.config_map.data.as_ref().unwrap();
    assert_eq!(data["CHATGATE_ENV"], "staging");
    assert_eq!(data["CHATGATE_JWT_ISSUER"], "https://issuer.example");
    assert!(!data.contains_key("CHATGATE_JWT_SECRET"));
    assert!(!data.contains_key("CHATGATE_LLM_API_KEY"));
    let c = container(&d);
    assert_eq!(
        c.env_from.as_ref().unwrap()[0]
            .config_map_ref
            .as_ref()
            .unwrap()
            .name,
        "chat-config"
    );
    let env = c.env.as_ref().unwrap();
    let by_name = |n: &str| env.iter().find(|e| e.name == n).unwrap();
    let key = by_name("CHATGATE_LLM_API_KEY")
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!((key.name.as_str(), key.key.as_str()), ("llm", "api-key"));
    let db = by_name("CHATGATE_DATABASE_URL")
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!(
        (db.name.as_str(), db.key.as_str()),
        ("chat-secrets", "database-url")
    );
    assert!(
        env.iter().all(|e| e.value.is_none()),
        "no secret value in the pod spec"
    );
}

#[test]
fn a_config_change_changes_the_pod_template_hash() {
    let a = built(
        &ChatService::test("c")
            .config("CHATGATE_MAX_CONNECTIONS", "100")
            .build(),
    );
    let b = built(
        &ChatService::test("c")
            .config("CHATGATE_MAX_CONNECTIONS", "200")
            .build(),
    );
    let hash = |d: &Desired| {
        d.deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()[ANNOTATION_CONFIG_HASH]
            .clone()
    };
    assert_ne!(hash(&a), hash(&b));
    assert_eq!(hash(&a), a.config_hash);
    // Same input, same hash: a resync builds byte-identical objects.
    assert_eq!(
        a,
        built(
            &ChatService::test("c")
                .config("CHATGATE_MAX_CONNECTIONS", "100")
                .build()
        )
    );
}

#[test]
fn every_child_carries_an_applied_hash_of_its_content() {
    let a = built(&default_cs());
    let b = built(
        &ChatService::test("chat")
            .namespace("team")
            .stored("uid-1", 3)
            .image("other:1")
            .build(),
    );
    let h = |o: &ObjectMeta| o.annotations.as_ref().unwrap()[ANNOTATION_APPLIED_HASH].clone();
    assert_ne!(h(&a.deployment.metadata), h(&b.deployment.metadata));
    assert_eq!(h(&a.service.metadata), h(&b.service.metadata));
    assert_eq!(h(&a.config_map.metadata), h(&b.config_map.metadata));
}

#[test]
fn pdb_only_with_two_or_more_replicas() {
    assert!(
        built(&ChatService::test("c").replicas(1).build())
            .pod_disruption_budget
            .is_none()
    );
    assert!(
        built(&ChatService::test("c").replicas(0).build())
            .pod_disruption_budget
            .is_none()
    );
    let d = built(&ChatService::test("c").replicas(2).build());
    let pdb = d.pod_disruption_budget.unwrap();
    let spec = pdb.spec.unwrap();
    assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(
        spec.selector.unwrap().match_labels.unwrap(),
        meta::selector_labels("c")
    );
}

#[test]
fn children_are_owned_by_the_chat_service_as_controller() {
    let d = built(&default_cs());
    for m in [
        &d.config_map.metadata,
        &d.deployment.metadata,
        &d.service.metadata,
    ] {
        let o = &m.owner_references.as_ref().unwrap()[0];
        assert_eq!(o.kind, "ChatService");
        assert_eq!(o.uid, "uid-1");
        assert_eq!(o.controller, Some(true));
        assert_eq!(m.namespace.as_deref(), Some("team"));
        assert_eq!(
            m.labels.as_ref().unwrap()[meta::LABEL_MANAGED_BY],
            meta::MANAGED_BY
        );
    }
    // Offline (no uid): no owner references.
    let offline = built(&ChatService::test("c").build());
    assert!(offline.deployment.metadata.owner_references.is_none());
}

#[test]
fn service_exposes_the_http_port_and_selects_the_pods() {
    let d = built(&default_cs());
    let spec = d.service.spec.as_ref().unwrap();
    assert_eq!(
        spec.selector.as_ref().unwrap(),
        &meta::selector_labels("chat")
    );
    let port = &spec.ports.as_ref().unwrap()[0];
    assert_eq!(port.port, SERVICE_PORT);
    assert_eq!(port.target_port, Some(IntOrString::String("http".into())));
    let template_labels = d
        .deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    for (k, v) in spec.selector.as_ref().unwrap() {
        assert_eq!(template_labels.get(k), Some(v));
    }
}

#[test]
fn resources_and_replicas_come_from_the_spec() {
    let mut cs = ChatService::test("c").replicas(4).build();
    cs.spec.resources =
        Some(serde_json::from_value(serde_json::json!({"limits": {"memory": "256Mi"}})).unwrap());
    let d = built(&cs);
    assert_eq!(d.deployment.spec.as_ref().unwrap().replicas, Some(4));
    let r = container(&d).resources.as_ref().unwrap();
    assert_eq!(r.limits.as_ref().unwrap()["memory"].0, "256Mi");
}

#[test]
fn render_yaml_has_one_document_per_child() {
    let d = built(&ChatService::test("c").replicas(2).build());
    let yaml = d.to_yaml().unwrap();
    assert_eq!(
        yaml.matches("\nkind: ").count() + usize::from(yaml.starts_with("kind: ")),
        4,
        "{yaml}"
    );
}

#[test]
fn scheduling_reaches_the_pod_template_and_is_absent_by_default() {
    let pod = pod_spec(&built(&default_cs())).clone();
    assert!(pod.node_selector.is_none() && pod.tolerations.is_none());

    let cs = ChatService::test("chat")
        .on_nodes("pool", "chat", "dedicated")
        .build();
    let d = built(&cs);
    let pod = pod_spec(&d);
    assert_eq!(
        pod.node_selector.as_ref().and_then(|s| s.get("pool")),
        Some(&"chat".to_owned())
    );
    let tolerations = pod.tolerations.as_ref().unwrap();
    assert_eq!(tolerations.len(), 1);
    assert_eq!(tolerations[0].key.as_deref(), Some("dedicated"));
    assert_eq!(tolerations[0].operator.as_deref(), Some("Exists"));
}

#[test]
fn a_spec_without_resources_gets_the_default_requests_and_limits() {
    let d = built(&default_cs());
    let r = container(&d).resources.clone().expect("resources");
    let q = |m: &Option<BTreeMap<String, Quantity>>, k: &str| m.as_ref().unwrap()[k].0.clone();
    assert_eq!(
        (q(&r.requests, "cpu"), q(&r.requests, "memory")),
        ("100m".to_owned(), "128Mi".to_owned())
    );
    assert_eq!(
        (q(&r.limits, "cpu"), q(&r.limits, "memory")),
        ("1".to_owned(), "512Mi".to_owned())
    );

    // Named resources are used as given, nothing merged in.
    let mut cs = default_cs();
    cs.spec.resources = Some(ResourceRequirements {
        limits: Some(BTreeMap::from([(
            "memory".to_owned(),
            Quantity("2Gi".to_owned()),
        )])),
        ..ResourceRequirements::default()
    });
    let r = container(&built(&cs)).resources.clone().expect("resources");
    assert_eq!(r.requests, None);
    assert_eq!(q(&r.limits, "memory"), "2Gi");
}
