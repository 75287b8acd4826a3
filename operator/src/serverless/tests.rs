//! The Cloud Run and Knative mappings and refusals, one test per rule.

use super::*;
use crate::configuration::declared_config;
use chatgate_contract::Environment;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

fn config_of(cs: &ChatService) -> ConfigSet {
    declared_config(&cs.spec, None).0
}

fn rendered(cs: &ChatService, target: Target) -> KnativeService {
    let config = config_of(cs);
    let refused = refusals(cs, &config, target);
    assert!(refused.is_empty(), "{refused:?}");
    knative_service(cs, &config, target)
}

fn container(s: &KnativeService) -> &Container {
    &s.spec.template.spec.containers[0]
}

fn annotation<'a>(s: &'a KnativeService, key: &str) -> Option<&'a str> {
    s.spec
        .template
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn env<'a>(s: &'a KnativeService, name: &str) -> Option<&'a EnvVar> {
    container(s).env.as_ref()?.iter().find(|e| e.name == name)
}

fn refused_fields(cs: &ChatService, target: Target) -> Vec<String> {
    refusals(cs, &config_of(cs), target)
        .into_iter()
        .map(|r| r.field)
        .collect()
}

fn with_limits(cs: ChatService, cpu: &str, memory: &str) -> ChatService {
    let mut cs = cs;
    cs.spec.resources = Some(ResourceRequirements {
        limits: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity(cpu.to_owned())),
            ("memory".to_owned(), Quantity(memory.to_owned())),
        ])),
        requests: Some(BTreeMap::from([(
            "cpu".to_owned(),
            Quantity("250m".to_owned()),
        )])),
        ..ResourceRequirements::default()
    });
    cs
}

#[test]
fn it_is_a_knative_service_for_both_targets() {
    for target in [Target::Cloudrun, Target::Knative] {
        let s = rendered(&ChatService::test("chat").namespace("team").build(), target);
        assert_eq!(s.api_version, "serving.knative.dev/v1");
        assert_eq!(s.kind, "Service");
        assert_eq!(s.metadata.name.as_deref(), Some("chat"));
        let yaml = s.to_yaml().unwrap();
        assert!(
            yaml.starts_with("apiVersion: serving.knative.dev/v1\n"),
            "{yaml}"
        );
    }
}

#[test]
fn cloud_run_has_no_namespace_and_knative_keeps_it() {
    let cs = ChatService::test("chat").namespace("team").build();
    assert_eq!(rendered(&cs, Target::Cloudrun).metadata.namespace, None);
    assert_eq!(
        rendered(&cs, Target::Knative).metadata.namespace.as_deref(),
        Some("team")
    );
}

#[test]
fn startup_probe_asks_health_startup_for_the_whole_budget() {
    for target in [Target::Cloudrun, Target::Knative] {
        let s = rendered(&ChatService::test("c").startup(120, 4).build(), target);
        let p = container(&s).startup_probe.as_ref().unwrap();
        assert_eq!(
            p.http_get.as_ref().unwrap().path.as_deref(),
            Some("/health/startup")
        );
        assert_eq!(p.period_seconds, Some(4));
        assert_eq!(p.failure_threshold, Some(30));
        assert!(p.timeout_seconds.unwrap() <= p.period_seconds.unwrap());
    }
}

#[test]
fn liveness_asks_health_live_only() {
    for target in [Target::Cloudrun, Target::Knative] {
        let s = rendered(&ChatService::test("c").build(), target);
        let p = container(&s).liveness_probe.as_ref().unwrap();
        assert_eq!(
            p.http_get.as_ref().unwrap().path.as_deref(),
            Some("/health/live")
        );
        assert_eq!(p.period_seconds, Some(LIVENESS_PERIOD_SECONDS));
    }
}

#[test]
fn knative_reads_readiness_and_cloud_run_stops_routing_at_sigterm() {
    let c = ChatService::test("c").build();
    let k = rendered(&c, Target::Knative);
    assert_eq!(
        container(&k)
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/health/ready")
    );
    assert!(
        container(&rendered(&c, Target::Cloudrun))
            .readiness_probe
            .is_none()
    );
}

#[test]
fn the_container_port_is_http1_on_8080_and_listen_comes_from_port() {
    let s = rendered(&ChatService::test("c").build(), Target::Cloudrun);
    let ports = container(&s).ports.as_ref().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].name.as_deref(), Some("http1"));
    assert_eq!(ports[0].container_port, 8080);
    // The platform sets $PORT; a CHATGATE_LISTEN would override it.
    assert!(env(&s, "CHATGATE_LISTEN").is_none());
    assert!(env(&s, "CHATGATE_TERMINATION_LOG").is_none());
    assert_eq!(
        env(&s, "CHATGATE_LOG_FORMAT").unwrap().value.as_deref(),
        Some("json")
    );
}

#[test]
fn the_request_timeout_lets_a_websocket_live_an_hour() {
    for target in [Target::Cloudrun, Target::Knative] {
        let s = rendered(&ChatService::test("c").build(), target);
        assert_eq!(s.spec.template.spec.timeout_seconds, 3600);
    }
}

#[test]
fn cloud_run_gets_session_affinity_and_startup_cpu_boost() {
    let s = rendered(&ChatService::test("c").build(), Target::Cloudrun);
    assert_eq!(
        annotation(&s, "run.googleapis.com/sessionAffinity"),
        Some("true")
    );
    assert_eq!(
        annotation(&s, "run.googleapis.com/startup-cpu-boost"),
        Some("true")
    );
    let k = rendered(&ChatService::test("c").build(), Target::Knative);
    assert_eq!(annotation(&k, "run.googleapis.com/sessionAffinity"), None);
}

#[test]
fn min_and_max_instances_are_the_replicas() {
    let c = ChatService::test("c").replicas(3).build();
    let s = rendered(&c, Target::Cloudrun);
    assert_eq!(
        annotation(&s, "autoscaling.knative.dev/minScale"),
        Some("3")
    );
    assert_eq!(
        annotation(&s, "autoscaling.knative.dev/maxScale"),
        Some("3")
    );
    let k = rendered(&c, Target::Knative);
    assert_eq!(
        annotation(&k, "autoscaling.knative.dev/min-scale"),
        Some("3")
    );
    assert_eq!(
        annotation(&k, "autoscaling.knative.dev/max-scale"),
        Some("3")
    );
}

#[test]
fn container_concurrency_is_the_connection_limit_within_the_platform() {
    let c = ChatService::test("c")
        .config("CHATGATE_MAX_CONNECTIONS", "250")
        .build();
    assert_eq!(
        rendered(&c, Target::Cloudrun)
            .spec
            .template
            .spec
            .container_concurrency,
        250
    );
    // The default (20000) is more than Cloud Run routes to one instance.
    let d = ChatService::test("c").build();
    let config = config_of(&d);
    assert_eq!(
        knative_service(&d, &config, Target::Cloudrun)
            .spec
            .template
            .spec
            .container_concurrency,
        1000
    );
    assert!(notes(&config, Target::Cloudrun)[0].contains("CHATGATE_MAX_CONNECTIONS is 20000"));
}

#[test]
fn resources_are_limits_on_cloud_run_and_as_written_on_knative() {
    let c = with_limits(ChatService::test("c").build(), "2", "1Gi");
    let s = rendered(&c, Target::Cloudrun);
    let r = container(&s).resources.as_ref().unwrap();
    assert_eq!(r.limits.as_ref().unwrap()["cpu"].0, "2");
    assert_eq!(r.limits.as_ref().unwrap()["memory"].0, "1Gi");
    assert!(r.requests.is_none());
    let k = rendered(&c, Target::Knative);
    assert_eq!(
        container(&k)
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()["cpu"]
            .0,
        "250m"
    );
}

#[test]
fn secrets_are_secret_manager_references_on_cloud_run() {
    let c = ChatService::test("c")
        .in_env(Environment::Staging)
        .with_secret("chat-secrets")
        .build();
    let s = rendered(&c, Target::Cloudrun);
    let r = env(&s, "CHATGATE_JWT_SECRET")
        .unwrap()
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!(
        (r.name.as_str(), r.key.as_str()),
        ("chat-secrets-jwt-secret", "latest")
    );
    assert!(env(&s, "CHATGATE_JWT_SECRET").unwrap().value.is_none());
    assert_eq!(secret_manager_name("tls", "tls.key"), "tls-tls-key");
}

#[test]
fn secrets_stay_kubernetes_secret_references_on_knative() {
    let c = ChatService::test("c")
        .in_env(Environment::Staging)
        .with_secret("chat-secrets")
        .build();
    let s = rendered(&c, Target::Knative);
    let r = env(&s, "CHATGATE_DATABASE_URL")
        .unwrap()
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!(
        (r.name.as_str(), r.key.as_str()),
        ("chat-secrets", "database-url")
    );
}

#[test]
fn literal_configuration_is_inline_environment() {
    let c = ChatService::test("c")
        .config("CHATGATE_RUNS_PER_MINUTE", "12")
        .build();
    for target in [Target::Cloudrun, Target::Knative] {
        let s = rendered(&c, target);
        assert_eq!(
            env(&s, "CHATGATE_RUNS_PER_MINUTE")
                .unwrap()
                .value
                .as_deref(),
            Some("12")
        );
        assert_eq!(
            env(&s, "CHATGATE_ENV").unwrap().value.as_deref(),
            Some("development")
        );
        assert_eq!(
            env(&s, "CHATGATE_DRAIN_SECONDS").unwrap().value.as_deref(),
            Some("5")
        );
    }
}

#[test]
fn cloud_run_labels_have_no_slashes() {
    let s = rendered(&ChatService::test("c").build(), Target::Cloudrun);
    for key in s.metadata.labels.as_ref().unwrap().keys() {
        assert!(!key.contains('/') && !key.contains('.'), "{key}");
    }
}

#[test]
fn knative_keeps_scheduling_and_the_config_map() {
    let mut c = ChatService::test("c")
        .on_nodes("pool", "chat", "dedicated")
        .build();
    c.spec.config_map_ref = Some(crate::crd::LocalObjectName {
        name: "extra".into(),
    });
    let s = rendered(&c, Target::Knative);
    assert_eq!(
        s.spec.template.spec.node_selector.as_ref().unwrap()["pool"],
        "chat"
    );
    assert_eq!(s.spec.template.spec.tolerations.as_ref().unwrap().len(), 1);
    assert_eq!(
        container(&s).env_from.as_ref().unwrap()[0]
            .config_map_ref
            .as_ref()
            .unwrap()
            .name,
        "extra"
    );
}

#[test]
fn kubernetes_refuses_nothing() {
    let c = ChatService::test("c").startup(3600, 60).replicas(0).build();
    assert!(refused_fields(&c, Target::Kubernetes).is_empty());
}

#[test]
fn a_startup_budget_over_240_seconds_is_refused_on_cloud_run() {
    let c = ChatService::test("c").startup(300, 5).build();
    let r = refusals(&c, &config_of(&c), Target::Cloudrun);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].field, "spec.startup.budgetSeconds");
    assert!(
        r[0].message.contains("300 s") && r[0].message.contains("240 s"),
        "{}",
        r[0]
    );
    assert!(
        refused_fields(
            &ChatService::test("c").startup(240, 5).build(),
            Target::Cloudrun
        )
        .is_empty()
    );
    assert!(refused_fields(&c, Target::Knative).is_empty());
}

#[test]
fn a_drain_longer_than_the_sigterm_window_is_refused_on_cloud_run() {
    let c = ChatService::test("c").drain_seconds(9).build();
    let r = refusals(&c, &config_of(&c), Target::Cloudrun);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].field, "spec.rollout.drainSeconds");
    assert!(r[0].message.contains("10 s after SIGTERM"), "{}", r[0]);
    assert!(r[0].fix.contains("8 or less"));
    assert!(
        refused_fields(
            &ChatService::test("c").drain_seconds(8).build(),
            Target::Cloudrun
        )
        .is_empty()
    );
}

#[test]
fn an_idle_timeout_over_the_request_timeout_is_refused() {
    let c = ChatService::test("c")
        .config("CHATGATE_IDLE_TIMEOUT_SECONDS", "7200")
        .build();
    for target in [Target::Cloudrun, Target::Knative] {
        let r = refusals(&c, &config_of(&c), target);
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].field, "CHATGATE_IDLE_TIMEOUT_SECONDS");
        assert!(r[0].message.contains("3600 s"));
    }
}

#[test]
fn zero_replicas_are_refused() {
    let c = ChatService::test("c").replicas(0).build();
    assert_eq!(refused_fields(&c, Target::Cloudrun), ["spec.replicas"]);
    assert_eq!(refused_fields(&c, Target::Knative), ["spec.replicas"]);
}

#[test]
fn a_name_longer_than_49_characters_is_refused_on_cloud_run() {
    let c = ChatService::test(&"c".repeat(50)).build();
    assert_eq!(refused_fields(&c, Target::Cloudrun), ["metadata.name"]);
}

#[test]
fn a_config_map_ref_is_refused_on_cloud_run() {
    let mut c = ChatService::test("c").build();
    c.spec.config_map_ref = Some(crate::crd::LocalObjectName {
        name: "extra".into(),
    });
    assert_eq!(refused_fields(&c, Target::Cloudrun), ["spec.configMapRef"]);
}

#[test]
fn scheduling_is_refused_on_cloud_run() {
    let c = ChatService::test("c")
        .on_nodes("pool", "chat", "dedicated")
        .build();
    assert_eq!(refused_fields(&c, Target::Cloudrun), ["spec.scheduling"]);
}

#[test]
fn more_than_8_cpus_or_32gi_are_refused_on_cloud_run() {
    let c = with_limits(ChatService::test("c").build(), "16", "64Gi");
    assert_eq!(
        refused_fields(&c, Target::Cloudrun),
        ["spec.resources.limits.cpu", "spec.resources.limits.memory"]
    );
    assert!(
        refused_fields(
            &with_limits(ChatService::test("c").build(), "8", "32Gi"),
            Target::Cloudrun
        )
        .is_empty()
    );
}

#[test]
fn less_than_one_cpu_with_concurrency_is_refused_on_cloud_run() {
    let c = with_limits(ChatService::test("c").build(), "500m", "512Mi");
    assert_eq!(
        refused_fields(&c, Target::Cloudrun),
        ["spec.resources.limits.cpu"]
    );
    let one = with_limits(
        ChatService::test("c")
            .config("CHATGATE_MAX_CONNECTIONS", "1")
            .build(),
        "500m",
        "512Mi",
    );
    assert!(refused_fields(&one, Target::Cloudrun).is_empty());
}

#[test]
fn unreadable_quantities_are_refused_not_guessed() {
    let c = with_limits(ChatService::test("c").build(), "lots", "plenty");
    assert_eq!(
        refused_fields(&c, Target::Cloudrun),
        ["spec.resources.limits.cpu", "spec.resources.limits.memory"]
    );
}

#[test]
fn quantities_parse_as_kubernetes_writes_them() {
    assert_eq!(cpu_millis("500m"), Some(500));
    assert_eq!(cpu_millis("1.5"), Some(1500));
    assert_eq!(memory_bytes("512Mi"), Some(512 * 1024 * 1024));
    assert_eq!(memory_bytes("1G"), Some(1_000_000_000));
    assert_eq!(memory_bytes("x"), None);
}

#[test]
fn the_target_annotation_is_read() {
    let mut c = ChatService::test("c").build();
    assert_eq!(Target::annotated(&c), None);
    c.annotations_mut()
        .insert(ANNOTATION_TARGET.into(), "cloudrun".into());
    assert_eq!(Target::annotated(&c), Some(Target::Cloudrun));
}
