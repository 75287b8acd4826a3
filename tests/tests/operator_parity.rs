//! Configuration validation and production parity against a real API server with
//! RBAC on. First the operator's `validation::check` on its own: it reads the
//! referenced Secrets, ConfigMaps and the baseline with only `get`, and reports what
//! is missing by name. Then the whole operator, in-process as the chart's
//! ServiceAccount with the chart's RBAC: a staging ChatService out
//! of parity stalls while the previous rollout keeps serving, and creating what was
//! missing (a Secret key, the baseline) clears the condition through the watches,
//! without touching the ChatService and long before any periodic resync.

mod operator_support;

use std::collections::BTreeSet;
use std::time::Duration;

use chatgate_contract::config::ProblemKind;
use chatgate_operator::conditions::{self, reason};
use chatgate_operator::crd::ChatService;
use chatgate_operator::meta;
use chatgate_operator::validation::{self, BASELINE_FIELD, Validation};
use chatgate_tests::{ControlPlane, TestNamespace, wait_for};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use operator_support::{OPERATOR_SA, Operator, install_chart_rbac, install_crd, options};
use serde_json::json;

use operator_support::TIMEOUT;

/// The read-only rules validation needs (the chart's ClusterRole grants these and
/// `list`/`watch` for the controller's watches).
fn validation_rules() -> serde_json::Value {
    json!([
        { "apiGroups": [""], "resources": ["secrets", "configmaps"], "verbs": ["get"] },
        { "apiGroups": ["chatgate.dev"], "resources": ["chatservices"], "verbs": ["get"] },
    ])
}

/// A client of a user bound to exactly `rules`, cluster-wide.
async fn client_with_rules(cp: &ControlPlane, user: &str, rules: serde_json::Value) -> Client {
    let admin = cp.client();
    let role: ClusterRole = serde_json::from_value(json!({
        "metadata": { "name": user },
        "rules": rules,
    }))
    .expect("a ClusterRole");
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": { "name": user },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": user },
        "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user }],
    }))
    .expect("a ClusterRoleBinding");
    let ssa = PatchParams::apply("chatgate-tests").force();
    Api::<ClusterRole>::all(admin.clone())
        .patch(user, &ssa, &Patch::Apply(&role))
        .await
        .expect("the ClusterRole applies");
    Api::<ClusterRoleBinding>::all(admin)
        .patch(user, &ssa, &Patch::Apply(&binding))
        .await
        .expect("the ClusterRoleBinding applies");
    cp.client_as(user, &[]).expect("a client certificate")
}

/// Waits until RBAC lets `client` read what validation reads in `ns` (bindings take
/// effect asynchronously in the authorizer's cache).
async fn wait_until_authorized(client: &Client, ns: &str) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    chatgate_tests::wait_until(TIMEOUT, "the validation role to take effect", || {
        let secrets = secrets.clone();
        async move {
            match secrets.get_opt("probe").await {
                Ok(_) => Ok(Some(())),
                Err(kube::Error::Api(e)) if e.code == 403 => Ok(None),
                Err(e) => Err(anyhow::anyhow!(e)),
            }
        }
    })
    .await
    .expect("the role takes effect");
}

fn chat_service(name: &str, spec: serde_json::Value) -> ChatService {
    serde_json::from_value(json!({
        "apiVersion": "chatgate.dev/v1alpha1",
        "kind": "ChatService",
        "metadata": { "name": name },
        "spec": spec,
    }))
    .expect("a ChatService")
}

fn production_spec() -> serde_json::Value {
    json!({
        "image": "registry.invalid/chatgate-service:1",
        "environment": "production",
        "replicas": 2,
        "jwt": { "issuer": "https://auth.example.com/", "audience": "chat",
                 "secretRef": { "name": "chat-jwt", "key": "secret" } },
        "llm": { "provider": "openai", "apiKeySecretRef": { "name": "chat-llm", "key": "api-key" } },
        "database": { "urlSecretRef": { "name": "chat-db", "key": "url" } },
    })
}

fn staging_spec(baseline_ns: &str) -> serde_json::Value {
    let mut spec = production_spec();
    spec["environment"] = json!("staging");
    spec["replicas"] = json!(1);
    spec["jwt"]["audience"] = json!("chat-staging");
    spec["parity"] = json!({ "baseline": { "name": "chat", "namespace": baseline_ns } });
    spec
}

fn secret(name: &str, data: &[(&str, &str)]) -> Secret {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "stringData": data.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
    }))
    .expect("a Secret")
}

async fn create<K>(api: &Api<K>, obj: &K) -> K
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned,
{
    api.create(&PostParams::default(), obj)
        .await
        .unwrap_or_else(|e| panic!("creating {obj:?}: {e}"))
}

/// `(key, rule)` of every problem, configuration and parity.
fn found(v: &Validation) -> BTreeSet<(String, &'static str)> {
    v.all_problems()
        .map(|p| (p.key.clone(), p.kind.rule()))
        .collect()
}

fn set(items: &[(&str, ProblemKind)]) -> BTreeSet<(String, &'static str)> {
    items
        .iter()
        .map(|(k, p)| (k.to_string(), p.rule()))
        .collect()
}

/// Production's ChatService, letting `staging` compare with it (a baseline in another
/// namespace must opt in).
fn production_baseline(staging: &TestNamespace) -> ChatService {
    let mut baseline = chat_service("chat", production_spec());
    baseline.annotations_mut().insert(
        meta::ANNOTATION_BASELINE_READABLE_FROM.to_owned(),
        format!("other-team, {}", staging.name()),
    );
    baseline
}

/// A production and a staging namespace, with production's ChatService in place.
struct Environments {
    production: TestNamespace,
    staging: TestNamespace,
}

async fn environments(cp: &ControlPlane, prefix: &str) -> Environments {
    install_crd(cp).await.expect("the CRD installs");
    let production = TestNamespace::new(cp, &format!("{prefix}-prd"))
        .await
        .unwrap();
    let staging = TestNamespace::new(cp, &format!("{prefix}-stg"))
        .await
        .unwrap();
    create(
        &production.api::<ChatService>(cp.client()),
        &production_baseline(&staging),
    )
    .await;
    Environments {
        production,
        staging,
    }
}

#[tokio::test]
async fn seed_scenario_the_missing_llm_key_is_named_in_config_and_parity() {
    let cp = ControlPlane::shared().await;
    let env = environments(cp, "seed").await;
    let client = client_with_rules(cp, "validation-seed", validation_rules()).await;
    wait_until_authorized(&client, env.staging.name()).await;
    let secrets = env.staging.api::<Secret>(cp.client());
    create(
        &secrets,
        &secret("chat-jwt", &[("secret", &"s".repeat(40))]),
    )
    .await;
    create(
        &secrets,
        &secret("chat-db", &[("url", "postgres://db/chat")]),
    )
    .await;

    let mut spec = staging_spec(env.production.name());
    spec["llm"] = json!({ "provider": "openai" });
    let staging = create(
        &env.staging.api::<ChatService>(cp.client()),
        &chat_service("chat", spec),
    )
    .await;

    let v = validation::check(&client, &staging)
        .await
        .expect("check reads");
    assert_eq!(
        found(&v),
        set(&[
            ("CHATGATE_LLM_API_KEY", ProblemKind::Required),
            ("CHATGATE_LLM_API_KEY", ProblemKind::ParityPresent),
        ])
    );
    assert_eq!(
        v.parity.as_ref().map(|p| p.baseline.clone()),
        Some(format!("{}/chat", env.production.name()))
    );
    assert!(v.blocks_rollout());
}

#[tokio::test]
async fn a_baseline_in_another_namespace_is_read_only_when_it_opts_in() {
    let cp = ControlPlane::shared().await;
    let env = environments(cp, "optin").await;
    let client = client_with_rules(cp, "validation-optin", validation_rules()).await;
    wait_until_authorized(&client, env.staging.name()).await;
    staging_secrets(cp, &env.staging).await;
    let staging = create(
        &env.staging.api::<ChatService>(cp.client()),
        &chat_service("chat", staging_spec(env.production.name())),
    )
    .await;
    assert!(
        validation::check(&client, &staging)
            .await
            .expect("check reads")
            .all_problems()
            .next()
            .is_none(),
        "opted in for staging: compared and in parity"
    );

    // Production withdraws the opt-in: the comparison is refused and says how to allow it.
    let production = env.production.api::<ChatService>(cp.client());
    production
        .patch(
            "chat",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
                meta::ANNOTATION_BASELINE_READABLE_FROM: "other-team"
            }}})),
        )
        .await
        .expect("the annotation changes");
    let v = validation::check(&client, &staging)
        .await
        .expect("check reads");
    assert_eq!(
        found(&v),
        set(&[(BASELINE_FIELD, ProblemKind::BaselineMissing)])
    );
    let p = v.all_problems().next().unwrap();
    assert!(
        p.message.contains(&format!(
            "does not allow reading from namespace `{}`",
            env.staging.name()
        )),
        "{p}"
    );
    assert!(
        p.fix.contains(&format!(
            "annotate chatservice chat {}={}",
            meta::ANNOTATION_BASELINE_READABLE_FROM,
            env.staging.name()
        )),
        "{p}"
    );
    assert!(v.blocks_rollout());
}

#[tokio::test]
async fn a_missing_secret_or_key_is_reported_until_it_exists() {
    let cp = ControlPlane::shared().await;
    let env = environments(cp, "refs").await;
    let client = client_with_rules(cp, "validation-refs", validation_rules()).await;
    wait_until_authorized(&client, env.staging.name()).await;
    let secrets = env.staging.api::<Secret>(cp.client());
    create(
        &secrets,
        &secret("chat-jwt", &[("secret", &"s".repeat(40))]),
    )
    .await;
    create(
        &secrets,
        &secret("chat-db", &[("url", "postgres://db/chat")]),
    )
    .await;
    let staging = create(
        &env.staging.api::<ChatService>(cp.client()),
        &chat_service("chat", staging_spec(env.production.name())),
    )
    .await;

    // No Secret chat-llm at all.
    let v = validation::check(&client, &staging)
        .await
        .expect("check reads");
    assert_eq!(
        found(&v),
        set(&[("CHATGATE_LLM_API_KEY", ProblemKind::MissingReference)])
    );
    let message = &v.config_problems[0].message;
    assert!(message.contains("Secret `chat-llm`"), "{message}");
    assert!(message.contains(env.staging.name()), "{message}");

    // The Secret, with the wrong key.
    create(&secrets, &secret("chat-llm", &[("apikey", "sk-1")])).await;
    let v = validation::check(&client, &staging)
        .await
        .expect("check reads");
    assert_eq!(
        found(&v),
        set(&[("CHATGATE_LLM_API_KEY", ProblemKind::MissingReference)])
    );
    assert!(
        v.config_problems[0]
            .message
            .contains("has no such key (it has `apikey`)")
    );

    // The key added: clean, and in parity with production in the other namespace.
    secrets
        .patch(
            "chat-llm",
            &PatchParams::default(),
            &Patch::Merge(json!({ "stringData": { "api-key": "sk-1" } })),
        )
        .await
        .expect("the key is added");
    let v = validation::check(&client, &staging)
        .await
        .expect("check reads");
    assert_eq!(found(&v), set(&[]));
    assert!(!v.blocks_rollout());
}

#[tokio::test]
async fn the_config_map_is_read_and_its_keys_validated() {
    let cp = ControlPlane::shared().await;
    let env = environments(cp, "cm").await;
    let client = client_with_rules(cp, "validation-cm", validation_rules()).await;
    wait_until_authorized(&client, env.staging.name()).await;
    let mut spec = staging_spec(env.production.name());
    spec["configMapRef"] = json!({ "name": "chat-config" });
    spec["parity"]["mode"] = json!("Warn");
    let staging = create(
        &env.staging.api::<ChatService>(cp.client()),
        &chat_service("chat", spec),
    )
    .await;
    let secrets = env.staging.api::<Secret>(cp.client());
    create(
        &secrets,
        &secret("chat-jwt", &[("secret", &"s".repeat(40))]),
    )
    .await;
    create(
        &secrets,
        &secret("chat-db", &[("url", "postgres://db/chat")]),
    )
    .await;
    create(&secrets, &secret("chat-llm", &[("api-key", "sk-1")])).await;

    let v = validation::check(&client, &staging)
        .await
        .expect("check reads");
    assert_eq!(
        found(&v),
        set(&[("spec.configMapRef", ProblemKind::MissingReference)])
    );

    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": { "name": "chat-config" },
        "data": { "CHATGATE_MAX_CONECTIONS": "10", "CHATGATE_LOG_FORMAT": "json" },
    }))
    .unwrap();
    create(&env.staging.api::<ConfigMap>(cp.client()), &cm).await;
    let v = validation::check(&client, &staging)
        .await
        .expect("check reads");
    assert_eq!(
        found(&v),
        set(&[("CHATGATE_MAX_CONECTIONS", ProblemKind::Unknown)])
    );
    assert_eq!(
        v.config_map_data
            .as_ref()
            .and_then(|d| d.get("CHATGATE_LOG_FORMAT"))
            .map(String::as_str),
        Some("json")
    );
}

#[tokio::test]
async fn a_baseline_that_is_missing_or_not_production_is_reported() {
    let cp = ControlPlane::shared().await;
    let env = environments(cp, "base").await;
    let client = client_with_rules(cp, "validation-base", validation_rules()).await;
    wait_until_authorized(&client, env.staging.name()).await;
    let chat_services = env.staging.api::<ChatService>(cp.client());

    let mut spec = staging_spec(env.production.name());
    spec["parity"]["baseline"]["name"] = json!("chat-prod");
    let typo = create(&chat_services, &chat_service("typo", spec)).await;
    let v = validation::check(&client, &typo)
        .await
        .expect("check reads");
    let parity = v.parity.as_ref().expect("parity is checked");
    assert_eq!(parity.problems.len(), 1, "{:?}", parity.problems);
    assert_eq!(parity.problems[0].key, BASELINE_FIELD);
    assert_eq!(parity.problems[0].kind, ProblemKind::BaselineMissing);
    assert!(parity.problems[0].message.contains("does not exist"));

    // A staging resource named as the baseline of another (same namespace by default).
    let mut spec = staging_spec(env.production.name());
    spec["parity"] = json!({ "baseline": { "name": "typo" } });
    let chained = create(&chat_services, &chat_service("chained", spec)).await;
    let v = validation::check(&client, &chained)
        .await
        .expect("check reads");
    let parity = v.parity.as_ref().expect("parity is checked");
    assert_eq!(parity.baseline, format!("{}/typo", env.staging.name()));
    assert!(
        parity.problems[0].message.contains("not production"),
        "{:?}",
        parity.problems
    );
}

#[tokio::test]
async fn without_read_access_to_secrets_the_problem_names_the_permission() {
    let cp = ControlPlane::shared().await;
    let env = environments(cp, "rbac").await;
    let client = client_with_rules(
        cp,
        "validation-no-secrets",
        json!([
            { "apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"] },
            { "apiGroups": ["chatgate.dev"], "resources": ["chatservices"], "verbs": ["get"] },
        ]),
    )
    .await;
    // Wait until the ConfigMap rule is in force, so a 403 below is about Secrets.
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), env.staging.name());
    chatgate_tests::wait_until(TIMEOUT, "the role to take effect", || {
        let config_maps = config_maps.clone();
        async move {
            match config_maps.get_opt("probe").await {
                Ok(_) => Ok(Some(())),
                Err(kube::Error::Api(e)) if e.code == 403 => Ok(None),
                Err(e) => Err(anyhow::anyhow!(e)),
            }
        }
    })
    .await
    .expect("the role takes effect");

    let staging = create(
        &env.staging.api::<ChatService>(cp.client()),
        &chat_service("chat", staging_spec(env.production.name())),
    )
    .await;
    let v = validation::check(&client, &staging)
        .await
        .expect("a 403 is a finding, not an error");
    let keys: BTreeSet<String> = v.config_problems.iter().map(|p| p.key.clone()).collect();
    assert_eq!(
        keys,
        [
            "CHATGATE_DATABASE_URL",
            "CHATGATE_JWT_SECRET",
            "CHATGATE_LLM_API_KEY"
        ]
        .map(String::from)
        .into()
    );
    for p in &v.config_problems {
        assert!(p.fix.contains("`get` on secrets"), "{p}");
    }
}

/// The operator in-process, scoped to the staging namespace and running as the
/// chart's ServiceAccount with the chart's RBAC, so the permissions the chart grants
/// are proven enough (a baseline in another namespace included). Its periodic resync
/// is far longer than any test: whatever it re-checks within a test, a watch made it.
async fn start_operator(cp: &ControlPlane, staging: &TestNamespace) -> Operator {
    install_chart_rbac(cp, staging.name()).expect("the chart's RBAC installs");
    let client = cp.client_as_service_account(staging.name(), OPERATOR_SA);
    let mut options = options(staging.name(), "parity");
    options.resync_seconds = 3600;
    let mut operator = Operator::start_with(client, options);
    operator
        .wait_leading(TIMEOUT)
        .await
        .expect("the operator leads");
    operator
}

const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(120);

fn condition<'a>(cs: &'a ChatService, type_: &str) -> Option<&'a Condition> {
    cs.status
        .as_ref()
        .and_then(|s| conditions::find(&s.conditions, type_))
}

/// `type_` has `status` for the ChatService's current generation.
fn condition_now(type_: &'static str, status: &'static str) -> impl Fn(&ChatService) -> bool {
    move |cs: &ChatService| {
        let generation = cs.metadata.generation;
        cs.status
            .as_ref()
            .is_some_and(|s| s.observed_generation == generation)
            && condition(cs, type_)
                .is_some_and(|c| c.status == status && c.observed_generation == generation)
    }
}

/// Secrets a complete staging spec references, all present.
async fn staging_secrets(cp: &ControlPlane, ns: &TestNamespace) {
    let secrets = ns.api::<Secret>(cp.client());
    create(
        &secrets,
        &secret("chat-jwt", &[("secret", &"s".repeat(40))]),
    )
    .await;
    create(
        &secrets,
        &secret(
            "chat-db",
            &[("url", "postgres://chat:pw@db.invalid:5432/chat")],
        ),
    )
    .await;
    create(&secrets, &secret("chat-llm", &[("api-key", "sk-1")])).await;
}

/// Names of the pods of a Deployment's current ReplicaSets, with their template hash.
async fn pods(cp: &ControlPlane, ns: &TestNamespace) -> BTreeSet<(String, String)> {
    ns.api::<Pod>(cp.client())
        .list(&ListParams::default())
        .await
        .expect("pods list")
        .items
        .into_iter()
        .map(|p| {
            let hash = p
                .labels()
                .get("pod-template-hash")
                .cloned()
                .unwrap_or_default();
            (p.name_any(), hash)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_scenario_staging_stalls_and_the_previous_rollout_keeps_serving() {
    let cp = ControlPlane::shared().await;
    let env = environments(cp, "op-seed").await;
    staging_secrets(cp, &env.staging).await;
    let operator = start_operator(cp, &env.staging).await;
    let chat_services = env.staging.api::<ChatService>(cp.client());
    let good = create(
        &chat_services,
        &chat_service("chat", staging_spec(env.production.name())),
    )
    .await;
    wait_for(
        &chat_services,
        "chat",
        ROLLOUT_TIMEOUT,
        condition_now(conditions::READY, "True"),
    )
    .await
    .expect("the complete staging configuration rolls out");
    let deployments = env.staging.api::<Deployment>(cp.client());
    let before = deployments.get("chat").await.expect("the Deployment");
    let serving = pods(cp, &env.staging).await;
    assert!(!serving.is_empty());

    // The outage: staging loses the LLM key reference production has.
    chat_services
        .patch(
            "chat",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "llm": { "apiKeySecretRef": null } } })),
        )
        .await
        .expect("the spec changes");
    let stalled = wait_for(
        &chat_services,
        "chat",
        TIMEOUT,
        condition_now(conditions::STALLED, "True"),
    )
    .await
    .expect("the ChatService stalls");
    let config_valid = condition(&stalled, conditions::CONFIG_VALID).expect("ConfigValid");
    assert_eq!(config_valid.status, "False");
    assert!(
        config_valid.message.contains("CHATGATE_LLM_API_KEY"),
        "{config_valid:?}"
    );
    let parity = condition(&stalled, conditions::PARITY_OK).expect("ParityOK");
    assert_eq!(parity.status, "False");
    assert!(
        parity.message.contains("CHATGATE_LLM_API_KEY"),
        "{parity:?}"
    );
    let problems = &stalled.status.as_ref().expect("status").problems;
    assert!(
        problems
            .iter()
            .any(|p| p.key == "CHATGATE_LLM_API_KEY" && p.rule == "parity:present"),
        "{problems:?}"
    );
    assert_eq!(
        stalled.status.as_ref().and_then(|s| s.applied_generation),
        good.metadata.generation
    );

    // Nothing of the new configuration was rolled out: same Deployment, same pods.
    let after = deployments.get("chat").await.expect("the Deployment");
    assert_eq!(after.metadata.generation, before.metadata.generation);
    assert_eq!(after.spec, before.spec);
    assert_eq!(pods(cp, &env.staging).await, serving);
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_the_missing_secret_key_clears_config_valid_without_touching_the_chatservice() {
    let cp = ControlPlane::shared().await;
    let env = environments(cp, "op-key").await;
    let secrets = env.staging.api::<Secret>(cp.client());
    create(
        &secrets,
        &secret("chat-jwt", &[("secret", &"s".repeat(40))]),
    )
    .await;
    create(
        &secrets,
        &secret(
            "chat-db",
            &[("url", "postgres://chat:pw@db.invalid:5432/chat")],
        ),
    )
    .await;
    create(&secrets, &secret("chat-llm", &[("apikey", "sk-1")])).await;
    let operator = start_operator(cp, &env.staging).await;
    let chat_services = env.staging.api::<ChatService>(cp.client());
    create(
        &chat_services,
        &chat_service("chat", staging_spec(env.production.name())),
    )
    .await;
    let stalled = wait_for(
        &chat_services,
        "chat",
        TIMEOUT,
        condition_now(conditions::CONFIG_VALID, "False"),
    )
    .await
    .expect("the missing key is found");
    let config_valid = condition(&stalled, conditions::CONFIG_VALID).unwrap();
    assert_eq!(config_valid.reason, reason::MISSING_REFERENCE);
    assert!(
        config_valid.message.contains("has no such key"),
        "{config_valid:?}"
    );
    assert!(condition_now(conditions::STALLED, "True")(&stalled));

    secrets
        .patch(
            "chat-llm",
            &PatchParams::default(),
            &Patch::Merge(json!({ "stringData": { "api-key": "sk-1" } })),
        )
        .await
        .expect("the key is added");
    let valid = wait_for(
        &chat_services,
        "chat",
        TIMEOUT,
        condition_now(conditions::CONFIG_VALID, "True"),
    )
    .await
    .expect("the Secret's change re-checks the ChatService");
    assert_eq!(valid.metadata.generation, stalled.metadata.generation);
    assert_eq!(valid.spec, stalled.spec);
    assert!(condition(&valid, conditions::STALLED).is_none());
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staging_database_on_sqlite_stalls_before_any_pod_and_postgres_fixes_it() {
    let cp = ControlPlane::shared().await;
    let env = environments(cp, "op-sqlite").await;
    let secrets = env.staging.api::<Secret>(cp.client());
    staging_secrets(cp, &env.staging).await;
    secrets
        .patch(
            "chat-db",
            &PatchParams::default(),
            &Patch::Merge(json!({ "stringData": { "url": "sqlite:///data/Hunter2-chat.db" } })),
        )
        .await
        .expect("the database Secret changes");
    let operator = start_operator(cp, &env.staging).await;
    let chat_services = env.staging.api::<ChatService>(cp.client());
    create(
        &chat_services,
        &chat_service("chat", staging_spec(env.production.name())),
    )
    .await;
    let stalled = wait_for(
        &chat_services,
        "chat",
        TIMEOUT,
        condition_now(conditions::STALLED, "True"),
    )
    .await
    .expect("SQLite in staging stalls the ChatService");
    let config_valid = condition(&stalled, conditions::CONFIG_VALID).expect("ConfigValid");
    assert_eq!(config_valid.status, "False");
    assert!(
        config_valid.message.contains("CHATGATE_DATABASE_URL")
            && config_valid.message.contains("SQLite"),
        "{config_valid:?}"
    );
    let problems = &stalled.status.as_ref().expect("status").problems;
    assert!(
        problems
            .iter()
            .any(|p| p.key == "CHATGATE_DATABASE_URL"
                && p.message.contains("point it at PostgreSQL")),
        "the status says what to configure: {problems:?}"
    );
    let shown = serde_json::to_string(&stalled.status).unwrap();
    assert!(!shown.contains("Hunter2"), "the URL is a secret: {shown}");
    let deployments = env.staging.api::<Deployment>(cp.client());
    assert!(
        deployments.get_opt("chat").await.expect("get").is_none(),
        "no workload exists for a configuration that cannot work"
    );

    secrets
        .patch(
            "chat-db",
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "stringData": { "url": "postgres://chat:pw@db.invalid:5432/chat" } }),
            ),
        )
        .await
        .expect("the database Secret is fixed");
    wait_for(
        &chat_services,
        "chat",
        TIMEOUT,
        condition_now(conditions::CONFIG_VALID, "True"),
    )
    .await
    .expect("pointing the Secret at PostgreSQL clears it, with no edit to the ChatService");
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_the_missing_baseline_clears_parity_without_touching_staging() {
    let cp = ControlPlane::shared().await;
    install_crd(cp).await.expect("the CRD installs");
    let production = TestNamespace::new(cp, "op-late-prd").await.unwrap();
    let staging = TestNamespace::new(cp, "op-late-stg").await.unwrap();
    staging_secrets(cp, &staging).await;
    let operator = start_operator(cp, &staging).await;
    let chat_services = staging.api::<ChatService>(cp.client());
    create(
        &chat_services,
        &chat_service("chat", staging_spec(production.name())),
    )
    .await;
    let missing = wait_for(
        &chat_services,
        "chat",
        TIMEOUT,
        condition_now(conditions::PARITY_OK, "False"),
    )
    .await
    .expect("the missing baseline is found");
    assert_eq!(
        condition(&missing, conditions::PARITY_OK).unwrap().reason,
        reason::BASELINE_MISSING
    );

    create(
        &production.api::<ChatService>(cp.client()),
        &production_baseline(&staging),
    )
    .await;
    let in_parity = wait_for(
        &chat_services,
        "chat",
        TIMEOUT,
        condition_now(conditions::PARITY_OK, "True"),
    )
    .await
    .expect("the baseline's creation re-checks staging");
    assert_eq!(in_parity.metadata.generation, missing.metadata.generation);
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_warn_rolls_out_and_enforce_stalls() {
    let cp = ControlPlane::shared().await;
    let env = environments(cp, "op-mode").await;
    staging_secrets(cp, &env.staging).await;
    let operator = start_operator(cp, &env.staging).await;
    let chat_services = env.staging.api::<ChatService>(cp.client());
    // A `match` key drifts: staging runs the built-in agent, production OpenAI.
    let mut spec = staging_spec(env.production.name());
    spec["llm"]["provider"] = json!("builtin");
    spec["parity"]["mode"] = json!("Warn");
    create(&chat_services, &chat_service("chat", spec)).await;

    let warned = wait_for(
        &chat_services,
        "chat",
        ROLLOUT_TIMEOUT,
        condition_now(conditions::READY, "True"),
    )
    .await
    .expect("Warn rolls out");
    let parity = condition(&warned, conditions::PARITY_OK).expect("ParityOK");
    assert_eq!(
        (parity.status.as_str(), parity.reason.as_str()),
        ("False", reason::PARITY_VIOLATION)
    );
    assert!(
        parity.message.contains("CHATGATE_LLM_PROVIDER"),
        "{parity:?}"
    );
    assert!(condition(&warned, conditions::STALLED).is_none());
    let deployments = env.staging.api::<Deployment>(cp.client());
    let before = deployments.get("chat").await.expect("the Deployment");

    chat_services
        .patch(
            "chat",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "parity": { "mode": "Enforce" } } })),
        )
        .await
        .expect("the mode changes");
    let stalled = wait_for(
        &chat_services,
        "chat",
        TIMEOUT,
        condition_now(conditions::STALLED, "True"),
    )
    .await
    .expect("Enforce stalls");
    assert_eq!(
        condition(&stalled, conditions::STALLED).unwrap().reason,
        reason::PARITY_VIOLATION
    );
    assert_eq!(
        condition(&stalled, conditions::CONFIG_VALID).map(|c| c.status.as_str()),
        Some("True")
    );
    assert_eq!(
        deployments.get("chat").await.expect("the Deployment").spec,
        before.spec
    );
    operator.stop().await;
}
