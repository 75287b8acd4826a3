//! Validation before rollout: the declared configuration, the Secrets and ConfigMap
//! it references, and parity with the production baseline.
//!
//! [`evaluate`] is pure: it sees the ChatService and what [`crate::dereference`]
//! read for it, and returns every problem at once, with the effective configuration
//! built once ([`ValidatedSpec`]) for the build step. The operator runs it through
//! [`check`]; `chatgate-operator validate` runs the same function on manifests, so
//! a pipeline and the cluster can never disagree about a configuration, and
//! `chatgate-operator render` builds from the same [`ValidatedSpec`].

use crate::configuration::{STRUCTURED_KEYS, declared_config};
use crate::crd::{ChatService, ParityMode};
use crate::dereference::{self, Dereferenced, Lookup};
use chatgate_contract::Environment;
use chatgate_contract::config::{
    ConfigSet, DATABASE_URL, KEY_PREFIX, Origin, ParityPolicy, Problem, ProblemKind,
    shared_database_problem,
};
use kube::ResourceExt;
use std::collections::BTreeMap;

/// The `key` of a problem about `spec.configMapRef` itself (not one of its keys).
pub const CONFIG_MAP_FIELD: &str = "spec.configMapRef";
/// The `key` of a problem about the baseline itself (missing, not production).
pub const BASELINE_FIELD: &str = "spec.parity.baseline";
/// The `key` of a problem about `spec.parity` on a production resource.
pub const PARITY_FIELD: &str = "spec.parity";

/// What validation found for one ChatService, and the configuration it validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Validation {
    /// Problems with this resource's own configuration and references (`ConfigValid`).
    pub config_problems: Vec<Problem>,
    /// Parity with the production baseline (`ParityOK`); `None` when no baseline is set.
    pub parity: Option<ParityOutcome>,
    /// Data of `spec.configMapRef` as read, so the workload can roll when it changes.
    pub config_map_data: Option<BTreeMap<String, String>>,
    /// What was validated; handed to the build step only through [`Validation::rollout`].
    spec: ValidatedSpec,
}

/// A ChatService's effective configuration, built once from its spec and the ConfigMap
/// read for it, with what else the build step needs. Keys the spec spells wrongly (a
/// structured key set as a free-form one) are already left out; the problems found
/// stay with the [`Validation`] (or the caller of [`ValidatedSpec::declared`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ValidatedSpec {
    config: ConfigSet,
    /// `resourceVersion` of each referenced Secret that was found, by name, so the
    /// workload rolls when a referenced Secret is rotated.
    secret_versions: BTreeMap<String, String>,
}

impl ValidatedSpec {
    /// The configuration `cs` declares, with the data of its `spec.configMapRef` when
    /// that was read (only its `CHATGATE_*` keys count), and the problems that can be
    /// found without a cluster: how the spec spells it and what the values are. The
    /// offline `render` takes this; [`evaluate`] starts from it.
    pub fn declared(
        cs: &ChatService,
        config_map_data: Option<&BTreeMap<String, String>>,
    ) -> (ValidatedSpec, Vec<Problem>) {
        let (config, mut problems) =
            declared_config(&cs.spec, config_map_data.map(configuration_keys).as_ref());
        problems.extend(config.validate(Origin::Manifest));
        let spec = ValidatedSpec {
            config,
            secret_versions: BTreeMap::new(),
        };
        (spec, problems)
    }

    /// The configuration the pods get.
    pub fn config(&self) -> &ConfigSet {
        &self.config
    }

    /// `resourceVersion` of each referenced Secret that was read, by name (none offline).
    pub fn secret_versions(&self) -> &BTreeMap<String, String> {
        &self.secret_versions
    }
}

/// The result of comparing with the baseline.
#[derive(Debug, Clone, PartialEq)]
pub struct ParityOutcome {
    /// `namespace/name` of the baseline.
    pub baseline: String,
    pub mode: ParityMode,
    pub problems: Vec<Problem>,
}

impl Validation {
    /// What to roll out: the validated spec, unless a problem blocks the rollout.
    pub fn rollout(&self) -> Option<&ValidatedSpec> {
        (!self.blocks_rollout()).then_some(&self.spec)
    }

    /// The validated spec whether or not a problem blocks it, for the offline checks
    /// that report on a configuration rather than roll it out.
    pub fn spec(&self) -> &ValidatedSpec {
        &self.spec
    }

    /// A configuration that must not be rolled out: the last good one keeps serving.
    pub fn blocks_rollout(&self) -> bool {
        !self.config_problems.is_empty()
            || self
                .parity
                .as_ref()
                .is_some_and(|p| p.mode == ParityMode::Enforce && !p.problems.is_empty())
    }

    /// Every problem, configuration first, then parity.
    pub fn all_problems(&self) -> impl Iterator<Item = &Problem> {
        self.config_problems
            .iter()
            .chain(self.parity.iter().flat_map(|p| p.problems.iter()))
    }
}

/// Reads what the spec points at and validates it.
pub async fn check(client: &kube::Client, cs: &ChatService) -> Result<Validation, kube::Error> {
    let read = dereference::read(client, cs).await?;
    Ok(evaluate(cs, &read))
}

/// The spec field a configuration key is set from, for messages.
fn field_of(key: &str) -> &'static str {
    STRUCTURED_KEYS
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, f)| *f)
        .unwrap_or("spec.config")
}

/// Only `CHATGATE_*` keys of a ConfigMap become service configuration, as in the
/// service, which reads only `CHATGATE_*` variables.
fn configuration_keys(data: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    data.iter()
        .filter(|(k, _)| k.starts_with(KEY_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Validates a ChatService against what was read for it. Pure; never panics.
pub fn evaluate(cs: &ChatService, read: &Dereferenced) -> Validation {
    let env = cs.spec.environment;
    let namespace = cs.namespace().unwrap_or_else(|| "default".to_string());
    let mut problems = Vec::new();

    let config_map_data = match (&cs.spec.config_map_ref, &read.config_map) {
        (Some(r), Some(Lookup::NotFound)) => {
            problems.push(Problem::new(
                CONFIG_MAP_FIELD,
                env,
                ProblemKind::MissingReference,
                format!("ConfigMap `{}` does not exist in namespace `{namespace}`", r.name),
                format!(
                    "create it in `{namespace}` (its CHATGATE_* keys become configuration) or remove spec.configMapRef"
                ),
            ));
            None
        }
        (Some(r), Some(Lookup::Forbidden(why))) => {
            problems.push(Problem::new(
                CONFIG_MAP_FIELD,
                env,
                ProblemKind::MissingReference,
                format!(
                    "ConfigMap `{}` in namespace `{namespace}` could not be read: {why}",
                    r.name
                ),
                "grant the operator `get` on configmaps in this namespace (the chart's RBAC does)",
            ));
            None
        }
        (Some(_), Some(Lookup::Found(data))) => Some(data.clone()),
        (_, _) => None,
    };

    let (mut spec, declared) = ValidatedSpec::declared(cs, config_map_data.as_ref());
    problems.extend(declared);
    if let Some(secrets) = &read.secrets {
        problems.extend(reference_problems(&spec.config, secrets, env, &namespace));
    }

    if env == Environment::Production && cs.spec.parity.is_some() {
        problems.push(Problem::new(
            PARITY_FIELD,
            env,
            ProblemKind::Invalid,
            "is set on a production ChatService, which is itself the parity baseline",
            "remove spec.parity from the production resource",
        ));
    }

    spec.secret_versions = read
        .secrets
        .iter()
        .flatten()
        .filter_map(|(name, lookup)| match lookup {
            Lookup::Found(keys) => keys.version.clone().map(|v| (name.clone(), v)),
            _ => None,
        })
        .collect();
    Validation {
        config_problems: problems,
        parity: parity(cs, &spec.config, read, &namespace),
        config_map_data,
        spec,
    }
}

/// Every Secret reference of the configuration checked against what the Secrets hold.
fn reference_problems(
    config: &ConfigSet,
    secrets: &BTreeMap<String, Lookup<dereference::SecretKeys>>,
    env: Environment,
    namespace: &str,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (config_key, secret, key) in config.secret_refs() {
        if secret.trim().is_empty() || key.trim().is_empty() {
            continue; // Reported by the contract as an incomplete reference.
        }
        let field = field_of(config_key);
        let found = secrets.get(secret).unwrap_or(&Lookup::NotFound);
        let (message, fix) = match found {
            Lookup::NotFound => (
                format!(
                    "comes from Secret `{secret}` (key `{key}`, {field}), which does not exist in namespace `{namespace}`"
                ),
                format!(
                    "create it: `kubectl -n {namespace} create secret generic {secret} --from-literal={key}=...`, or point {field} at an existing Secret"
                ),
            ),
            Lookup::Forbidden(why) => (
                format!(
                    "comes from Secret `{secret}` in namespace `{namespace}`, which could not be read: {why}"
                ),
                "grant the operator `get` on secrets in this namespace (the chart's RBAC does)"
                    .to_string(),
            ),
            Lookup::Found(keys) if !keys.keys.contains(key) => {
                let has = if keys.keys.is_empty() {
                    "it has no keys".to_string()
                } else {
                    format!(
                        "it has {}",
                        keys.keys
                            .iter()
                            .map(|k| format!("`{k}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                (
                    format!(
                        "comes from key `{key}` of Secret `{secret}` ({field}), which has no such key ({has})"
                    ),
                    format!(
                        "add key `{key}` to Secret `{secret}`, or point {field} at the key that holds it"
                    ),
                )
            }
            Lookup::Found(keys) if keys.empty.contains(key) => (
                format!("comes from key `{key}` of Secret `{secret}` ({field}), which is empty"),
                format!("put the value into key `{key}` of Secret `{secret}`"),
            ),
            Lookup::Found(keys) => {
                if config_key == DATABASE_URL
                    && let Some(mut problem) = keys
                        .schemes
                        .get(key)
                        .and_then(|scheme| shared_database_problem(env, scheme))
                {
                    problem.message = format!(
                        "comes from key `{key}` of Secret `{secret}` ({field}) and {}",
                        problem.message
                    );
                    problems.push(problem);
                }
                continue;
            }
        };
        problems.push(Problem::new(
            config_key,
            env,
            ProblemKind::MissingReference,
            message,
            fix,
        ));
    }
    problems
}

fn parity(
    cs: &ChatService,
    config: &ConfigSet,
    read: &Dereferenced,
    namespace: &str,
) -> Option<ParityOutcome> {
    let spec = cs.spec.parity.as_ref()?;
    if cs.spec.environment == Environment::Production {
        return None;
    }
    let env = cs.spec.environment;
    let (baseline_ns, baseline_name) =
        dereference::baseline_of(cs).unwrap_or_else(|| (namespace.to_string(), String::new()));
    let baseline = format!("{baseline_ns}/{baseline_name}");
    let baseline_problem = |message: String, fix: String| {
        vec![Problem::new(
            BASELINE_FIELD,
            env,
            ProblemKind::BaselineMissing,
            message,
            fix,
        )]
    };
    let problems = match &read.baseline {
        None | Some(Lookup::NotFound) => baseline_problem(
            format!("the production baseline ChatService `{baseline}` does not exist"),
            format!(
                "create `{baseline}` (environment: production) or correct spec.parity.baseline; offline, pass its manifest among the files"
            ),
        ),
        Some(Lookup::Forbidden(why)) => baseline_problem(
            format!("the production baseline ChatService `{baseline}` could not be read: {why}"),
            format!("grant the operator `get` on chatservices in namespace `{baseline_ns}`"),
        ),
        Some(Lookup::Found(b))
            if !dereference::baseline_readable_from(&b.resource, &baseline_ns, namespace) =>
        {
            baseline_problem(
                format!(
                    "the production baseline ChatService `{baseline}` is in another namespace and does not allow reading from namespace `{namespace}`"
                ),
                format!(
                    "if the owners of `{baseline}` agree, they annotate it: `kubectl -n {baseline_ns} annotate chatservice {baseline_name} {}={namespace}` (a comma-separated list of namespaces, or *)",
                    crate::meta::ANNOTATION_BASELINE_READABLE_FROM
                ),
            )
        }
        Some(Lookup::Found(b)) if b.resource.spec.environment != Environment::Production => {
            baseline_problem(
                format!(
                    "the baseline ChatService `{baseline}` is a {} resource, not production",
                    b.resource.spec.environment
                ),
                "point spec.parity.baseline at the production ChatService".to_string(),
            )
        }
        Some(Lookup::Found(b)) => {
            // The baseline's own problems are reported on the baseline; here only the
            // comparison counts, so its spell-it-differently problems are dropped.
            let cm = b.config_map.as_ref().map(configuration_keys);
            let (theirs, _) = declared_config(&b.resource.spec, cm.as_ref());
            let policy = ParityPolicy {
                allowed_differences: spec.allowed_differences.iter().cloned().collect(),
            };
            config.parity_with(&theirs, &policy)
        }
    };
    Some(ParityOutcome {
        baseline,
        mode: spec.mode,
        problems,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dereference::{Baseline, SecretKeys};
    use chatgate_contract::config::KEYS;
    use proptest::prelude::*;

    const SECRETS: &str = "  jwt: {issuer: https://auth.example.com/, audience: chat, secretRef: {name: jwt, key: secret}}\n  database: {urlSecretRef: {name: db, key: url}}\n";

    fn cs(namespace: &str, name: &str, spec: &str) -> ChatService {
        let yaml = format!(
            "apiVersion: chatgate.dev/v1alpha1\nkind: ChatService\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  image: x\n{spec}"
        );
        let mut cs: ChatService = serde_norway::from_str(&yaml).expect("test ChatService parses");
        // Every fixture lets stg compare with it; the opt-in has its own test.
        cs.annotations_mut().insert(
            crate::meta::ANNOTATION_BASELINE_READABLE_FROM.to_owned(),
            "stg".to_owned(),
        );
        cs
    }

    #[test]
    fn a_baseline_elsewhere_without_the_opt_in_is_refused_naming_the_annotation() {
        for opt_in in [None, Some("other"), Some(" other , dev ")] {
            let mut prod = production();
            match opt_in {
                Some(list) => prod.annotations_mut().insert(
                    crate::meta::ANNOTATION_BASELINE_READABLE_FROM.to_owned(),
                    list.to_owned(),
                ),
                None => prod
                    .annotations_mut()
                    .remove(crate::meta::ANNOTATION_BASELINE_READABLE_FROM),
            };
            let mut read = all_present();
            read.baseline = Some(Lookup::Found(Baseline {
                resource: prod,
                config_map: None,
            }));
            let v = evaluate(&staging(OPENAI_WITH_KEY), &read);
            let parity = v.parity.expect("parity");
            assert_eq!(parity.problems.len(), 1, "{opt_in:?}");
            let p = &parity.problems[0];
            assert_eq!(p.kind, ProblemKind::BaselineMissing);
            assert!(
                p.message
                    .contains("does not allow reading from namespace `stg`"),
                "{p}"
            );
            assert!(
                p.fix.contains(
                    "kubectl -n prd annotate chatservice chat chatgate.dev/baseline-readable-from=stg"
                ),
                "{p}"
            );
        }
        for opt_in in ["stg", "dev, stg", "*"] {
            let mut prod = production();
            prod.annotations_mut().insert(
                crate::meta::ANNOTATION_BASELINE_READABLE_FROM.to_owned(),
                opt_in.to_owned(),
            );
            let mut read = all_present();
            read.baseline = Some(Lookup::Found(Baseline {
                resource: prod,
                config_map: None,
            }));
            let v = evaluate(&staging(OPENAI_WITH_KEY), &read);
            assert!(v.parity.expect("parity").problems.is_empty(), "{opt_in}");
        }
    }

    fn production() -> ChatService {
        cs(
            "prd",
            "chat",
            &format!(
                "  environment: production\n  replicas: 2\n  llm: {{provider: openai, apiKeySecretRef: {{name: llm, key: api-key}}}}\n{SECRETS}"
            ),
        )
    }

    fn staging(extra: &str) -> ChatService {
        cs(
            "stg",
            "chat",
            &format!(
                "  environment: staging\n  parity: {{baseline: {{name: chat, namespace: prd}}}}\n{SECRETS}{extra}"
            ),
        )
    }

    fn keys(names: &[&str]) -> Lookup<SecretKeys> {
        let mut k = SecretKeys::default();
        for n in names {
            k.insert(n, false);
        }
        Lookup::Found(k)
    }

    /// Every Secret the staging spec names exists with its key, and the baseline is read.
    fn all_present() -> Dereferenced {
        Dereferenced {
            config_map: None,
            secrets: Some(
                [
                    ("jwt".to_string(), keys(&["secret"])),
                    ("db".to_string(), keys(&["url"])),
                    ("llm".to_string(), keys(&["api-key"])),
                ]
                .into(),
            ),
            baseline: Some(Lookup::Found(Baseline {
                resource: production(),
                config_map: None,
            })),
        }
    }

    fn kinds(problems: &[Problem]) -> Vec<(String, ProblemKind)> {
        problems.iter().map(|p| (p.key.clone(), p.kind)).collect()
    }

    const OPENAI_WITH_KEY: &str =
        "  llm: {provider: openai, apiKeySecretRef: {name: llm, key: api-key}}\n";

    #[test]
    fn staging_equal_to_production_with_every_reference_present_is_clean() {
        let v = evaluate(&staging(OPENAI_WITH_KEY), &all_present());
        assert_eq!(v.config_problems, vec![]);
        let parity = v.parity.as_ref().expect("parity is checked");
        assert_eq!(parity.baseline, "prd/chat");
        assert_eq!(parity.problems, vec![]);
        assert!(!v.blocks_rollout());
    }

    #[test]
    fn seed_scenario_staging_without_the_llm_key_is_invalid_and_out_of_parity() {
        let v = evaluate(&staging("  llm: {provider: openai}\n"), &all_present());
        assert_eq!(
            kinds(&v.config_problems),
            [("CHATGATE_LLM_API_KEY".to_string(), ProblemKind::Required)]
        );
        let parity = v.parity.as_ref().expect("parity is checked");
        assert_eq!(
            kinds(&parity.problems),
            [(
                "CHATGATE_LLM_API_KEY".to_string(),
                ProblemKind::ParityPresent
            )]
        );
        assert!(v.blocks_rollout());
        for p in v.all_problems() {
            assert_eq!(p.environment, Environment::Staging);
            assert!(!p.fix.is_empty() && !p.message.is_empty(), "{p}");
        }
    }

    #[test]
    fn a_missing_secret_names_the_secret_the_key_and_how_to_create_it() {
        let mut read = all_present();
        read.secrets.as_mut().unwrap().remove("llm");
        let v = evaluate(&staging(OPENAI_WITH_KEY), &read);
        assert_eq!(
            kinds(&v.config_problems),
            [(
                "CHATGATE_LLM_API_KEY".to_string(),
                ProblemKind::MissingReference
            )]
        );
        let p = &v.config_problems[0];
        assert!(p.message.contains("Secret `llm`"), "{p}");
        assert!(
            p.message.contains("does not exist in namespace `stg`"),
            "{p}"
        );
        assert!(p.message.contains("spec.llm.apiKeySecretRef"), "{p}");
        assert!(
            p.fix
                .contains("kubectl -n stg create secret generic llm --from-literal=api-key="),
            "{p}"
        );
        assert!(v.blocks_rollout());
    }

    #[test]
    fn a_secret_without_the_key_lists_the_keys_it_has() {
        let mut read = all_present();
        read.secrets
            .as_mut()
            .unwrap()
            .insert("llm".into(), keys(&["apikey", "token"]));
        let v = evaluate(&staging(OPENAI_WITH_KEY), &read);
        assert_eq!(v.config_problems.len(), 1, "{:?}", v.config_problems);
        let p = &v.config_problems[0];
        assert_eq!(p.kind, ProblemKind::MissingReference);
        assert!(p.message.contains("has no such key"), "{p}");
        assert!(p.message.contains("`apikey`, `token`"), "{p}");
        assert!(p.fix.contains("add key `api-key` to Secret `llm`"), "{p}");
    }

    #[test]
    fn a_database_secret_holding_a_sqlite_url_is_refused_outside_development() {
        let sqlite = |read: &mut Dereferenced| {
            let mut k = SecretKeys::default();
            k.insert_value("url", b"sqlite:///data/Hunter2-chat.db");
            read.secrets
                .as_mut()
                .unwrap()
                .insert("db".into(), Lookup::Found(k));
        };
        let mut read = all_present();
        sqlite(&mut read);
        let v = evaluate(&staging(OPENAI_WITH_KEY), &read);
        assert_eq!(v.config_problems.len(), 1, "{:?}", v.config_problems);
        let p = &v.config_problems[0];
        assert_eq!(p.key, DATABASE_URL);
        assert!(p.message.contains("key `url` of Secret `db`"), "{p}");
        assert!(p.message.contains("SQLite"), "{p}");
        assert!(p.fix.contains("PostgreSQL"), "{p}");
        assert!(!p.to_string().contains("Hunter2"), "{p}");

        let dev = cs(
            "dev",
            "chat",
            &format!("  environment: development\n{SECRETS}"),
        );
        let mut read = all_present();
        sqlite(&mut read);
        assert!(evaluate(&dev, &read).config_problems.is_empty());
    }

    #[test]
    fn an_empty_secret_key_is_as_missing_as_none() {
        let mut read = all_present();
        let mut k = SecretKeys::default();
        k.insert("api-key", true);
        read.secrets
            .as_mut()
            .unwrap()
            .insert("llm".into(), Lookup::Found(k));
        let v = evaluate(&staging(OPENAI_WITH_KEY), &read);
        assert_eq!(v.config_problems.len(), 1);
        assert!(v.config_problems[0].message.contains("is empty"));
    }

    #[test]
    fn an_unreadable_secret_says_which_permission_is_missing() {
        let mut read = all_present();
        read.secrets.as_mut().unwrap().insert(
            "db".into(),
            Lookup::Forbidden("secrets \"db\" is forbidden".into()),
        );
        let v = evaluate(&staging(OPENAI_WITH_KEY), &read);
        assert_eq!(
            kinds(&v.config_problems),
            [(
                "CHATGATE_DATABASE_URL".to_string(),
                ProblemKind::MissingReference
            )]
        );
        assert!(v.config_problems[0].fix.contains("`get` on secrets"));
    }

    #[test]
    fn secrets_that_were_not_looked_up_are_not_reported() {
        let mut read = all_present();
        read.secrets = None;
        let v = evaluate(&staging(OPENAI_WITH_KEY), &read);
        assert_eq!(v.config_problems, vec![]);
    }

    #[test]
    fn a_missing_config_map_is_reported_on_its_field() {
        let mut read = all_present();
        read.config_map = Some(Lookup::NotFound);
        let v = evaluate(
            &staging(&format!(
                "{OPENAI_WITH_KEY}  configMapRef: {{name: chat-config}}\n"
            )),
            &read,
        );
        assert_eq!(
            kinds(&v.config_problems),
            [(CONFIG_MAP_FIELD.to_string(), ProblemKind::MissingReference)]
        );
        assert!(
            v.config_problems[0]
                .message
                .contains("ConfigMap `chat-config`")
        );
        assert_eq!(v.config_map_data, None);
    }

    #[test]
    fn config_map_keys_are_validated_and_other_keys_ignored() {
        let mut read = all_present();
        let data: BTreeMap<String, String> = [
            ("CHATGATE_MAX_CONNECTIONS", "100"),
            ("CHATGATE_MAX_CONECTIONS", "100"),
            ("CHATGATE_SEND_QUEUE", "zero"),
            ("CHATGATE_JWT_ALGORITHM", "RS256"),
            ("unrelated.properties", "a=b"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        read.config_map = Some(Lookup::Found(data.clone()));
        let v = evaluate(
            &staging(&format!(
                "{OPENAI_WITH_KEY}  configMapRef: {{name: chat-config}}\n"
            )),
            &read,
        );
        let mut found = kinds(&v.config_problems);
        found.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            found,
            [
                ("CHATGATE_JWT_ALGORITHM".to_string(), ProblemKind::Invalid),
                ("CHATGATE_MAX_CONECTIONS".to_string(), ProblemKind::Unknown),
                ("CHATGATE_SEND_QUEUE".to_string(), ProblemKind::Invalid),
            ]
        );
        assert_eq!(v.config_map_data, Some(data));
    }

    #[test]
    fn a_missing_baseline_is_reported_as_such() {
        let mut read = all_present();
        read.baseline = Some(Lookup::NotFound);
        let v = evaluate(&staging(OPENAI_WITH_KEY), &read);
        let parity = v.parity.expect("parity");
        assert_eq!(
            kinds(&parity.problems),
            [(BASELINE_FIELD.to_string(), ProblemKind::BaselineMissing)]
        );
        assert!(
            parity.problems[0]
                .message
                .contains("`prd/chat` does not exist")
        );
    }

    #[test]
    fn a_baseline_that_is_not_production_is_reported() {
        let mut read = all_present();
        read.baseline = Some(Lookup::Found(Baseline {
            resource: staging(OPENAI_WITH_KEY),
            config_map: None,
        }));
        let v = evaluate(&staging(OPENAI_WITH_KEY), &read);
        let parity = v.parity.expect("parity");
        assert_eq!(parity.problems.len(), 1);
        assert_eq!(parity.problems[0].kind, ProblemKind::BaselineMissing);
        assert!(parity.problems[0].message.contains("not production"));
    }

    #[test]
    fn an_unreadable_baseline_names_the_permission() {
        let mut read = all_present();
        read.baseline = Some(Lookup::Forbidden("forbidden".into()));
        let v = evaluate(&staging(OPENAI_WITH_KEY), &read);
        let parity = v.parity.expect("parity");
        assert!(
            parity.problems[0]
                .fix
                .contains("chatservices in namespace `prd`")
        );
    }

    #[test]
    fn match_drift_is_reported_and_an_allowed_difference_is_not() {
        let drift = "  llm: {provider: openai, apiKeySecretRef: {name: llm, key: api-key}}\n  jwt: {algorithm: ES256, issuer: https://auth.example.com/, audience: chat, publicKeyRef: {name: jwt, key: pub}}\n  database: {urlSecretRef: {name: db, key: url}}\n";
        let staging_es256 = |allowed: &str| {
            cs(
                "stg",
                "chat",
                &format!(
                    "  environment: staging\n  parity: {{baseline: {{name: chat, namespace: prd}}{allowed}}}\n{drift}"
                ),
            )
        };
        let mut read = all_present();
        read.secrets
            .as_mut()
            .unwrap()
            .insert("jwt".into(), keys(&["secret", "pub"]));
        let v = evaluate(&staging_es256(""), &read);
        assert_eq!(v.config_problems, vec![]);
        let found: Vec<_> = kinds(&v.parity.as_ref().unwrap().problems);
        assert!(
            found.contains(&(
                "CHATGATE_JWT_ALGORITHM".to_string(),
                ProblemKind::ParityMatch
            )),
            "{found:?}"
        );
        assert!(v.blocks_rollout());

        let v = evaluate(
            &staging_es256(", allowedDifferences: [CHATGATE_JWT_ALGORITHM, CHATGATE_JWT_SECRET]"),
            &read,
        );
        assert_eq!(v.parity.unwrap().problems, vec![]);
    }

    #[test]
    fn warn_mode_reports_without_blocking_and_enforce_blocks() {
        let warn = cs(
            "stg",
            "chat",
            &format!(
                "  environment: staging\n  parity: {{baseline: {{name: chat, namespace: prd}}, mode: Warn}}\n{SECRETS}  llm: {{provider: builtin}}\n"
            ),
        );
        let v = evaluate(&warn, &all_present());
        assert_eq!(v.config_problems, vec![]);
        let parity = v.parity.as_ref().unwrap();
        assert_eq!(parity.mode, ParityMode::Warn);
        assert!(!parity.problems.is_empty());
        assert!(!v.blocks_rollout());

        let enforce = staging("  llm: {provider: builtin}\n");
        assert!(evaluate(&enforce, &all_present()).blocks_rollout());
    }

    #[test]
    fn the_baselines_config_map_takes_part_in_parity() {
        let mut read = all_present();
        let mut prod = production();
        prod.spec.config_map_ref = Some(crate::crd::LocalObjectName {
            name: "prod-config".into(),
        });
        read.baseline = Some(Lookup::Found(Baseline {
            resource: prod,
            config_map: Some([("CHATGATE_PROTOCOL_VERSION".to_string(), "2".to_string())].into()),
        }));
        let v = evaluate(&staging(OPENAI_WITH_KEY), &read);
        assert_eq!(
            kinds(&v.parity.unwrap().problems),
            [(
                "CHATGATE_PROTOCOL_VERSION".to_string(),
                ProblemKind::ParityMatch
            )]
        );
    }

    #[test]
    fn production_has_no_parity_and_may_not_declare_one() {
        let v = evaluate(&production(), &all_present());
        assert_eq!(v.parity, None);
        assert_eq!(v.config_problems, vec![]);
        let mut p = production();
        p.spec.parity = staging("").spec.parity;
        let v = evaluate(&p, &all_present());
        assert_eq!(
            kinds(&v.config_problems),
            [(PARITY_FIELD.to_string(), ProblemKind::Invalid)]
        );
        assert_eq!(v.parity, None);
    }

    #[test]
    fn without_spec_parity_nothing_is_compared() {
        let c = cs(
            "stg",
            "chat",
            &format!("  environment: staging\n{SECRETS}{OPENAI_WITH_KEY}"),
        );
        assert_eq!(evaluate(&c, &all_present()).parity, None);
    }

    fn arbitrary_name() -> impl Strategy<Value = String> {
        prop_oneof!["[a-z]{1,4}", Just("llm".to_string()), ".{0,8}"]
    }

    fn arbitrary_lookup<T: std::fmt::Debug + Clone>(
        found: impl Strategy<Value = T>,
    ) -> impl Strategy<Value = Lookup<T>> {
        prop_oneof![
            found.prop_map(Lookup::Found),
            Just(Lookup::NotFound),
            ".{0,10}".prop_map(Lookup::Forbidden),
        ]
    }

    fn arbitrary_config() -> impl Strategy<Value = BTreeMap<String, String>> {
        let key = prop_oneof![
            proptest::sample::select(KEYS.iter().map(|k| k.key.to_string()).collect::<Vec<_>>()),
            "CHATGATE_[A-Z_]{0,10}",
            ".{1,10}",
        ];
        proptest::collection::btree_map(key, ".{0,20}", 0..6)
    }

    fn arbitrary_spec() -> impl Strategy<Value = serde_json::Value> {
        let secret_ref = || proptest::option::of((arbitrary_name(), arbitrary_name()));
        let as_ref = |r: Option<(String, String)>| {
            r.map(|(name, key)| serde_json::json!({"name": name, "key": key}))
        };
        (
            proptest::sample::select(vec!["development", "staging", "production"]),
            proptest::sample::select(vec!["HS256", "RS256", "ES256"]),
            proptest::sample::select(vec!["builtin", "openai"]),
            (secret_ref(), secret_ref(), secret_ref(), secret_ref()),
            arbitrary_config(),
            proptest::option::of(arbitrary_name()),
            proptest::option::of((
                arbitrary_name(),
                proptest::option::of(arbitrary_name()),
                proptest::collection::vec(
                    prop_oneof![
                        proptest::sample::select(
                            KEYS.iter().map(|k| k.key.to_string()).collect::<Vec<_>>()
                        ),
                        // An empty key name is the CRD's to refuse (items need
                        // minLength 1); the contract reports it, but names nothing.
                        ".{1,10}"
                    ],
                    0..4,
                ),
                proptest::bool::ANY,
            )),
        )
            .prop_map(move |(env, alg, provider, (jwt, public, llm, db), config, cm, parity)| {
                let mut spec = serde_json::json!({
                    "image": "x",
                    "environment": env,
                    "jwt": {"algorithm": alg, "secretRef": as_ref(jwt), "publicKeyRef": as_ref(public), "issuer": "i"},
                    "llm": {"provider": provider, "apiKeySecretRef": as_ref(llm)},
                    "database": {"urlSecretRef": as_ref(db)},
                    "config": config,
                });
                if let Some(name) = cm {
                    spec["configMapRef"] = serde_json::json!({"name": name});
                }
                if let Some((name, namespace, allowed, warn)) = parity {
                    spec["parity"] = serde_json::json!({
                        "baseline": {"name": name, "namespace": namespace},
                        "allowedDifferences": allowed,
                        "mode": if warn { "Warn" } else { "Enforce" },
                    });
                }
                strip_nulls(spec)
            })
    }

    /// `Option` fields are absent, not null, in a manifest.
    fn strip_nulls(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => serde_json::Value::Object(
                m.into_iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k, strip_nulls(v)))
                    .collect(),
            ),
            other => other,
        }
    }

    fn from_spec(spec: serde_json::Value, namespace: &str) -> ChatService {
        let mut cs: ChatService = serde_json::from_value(serde_json::json!({
            "apiVersion": "chatgate.dev/v1alpha1",
            "kind": "ChatService",
            "metadata": {"name": "arbitrary", "namespace": namespace},
            "spec": spec,
        }))
        .expect("generated spec deserializes");
        cs.metadata.namespace = Some(namespace.to_string());
        cs.annotations_mut().insert(
            crate::meta::ANNOTATION_BASELINE_READABLE_FROM.to_owned(),
            "*".to_owned(),
        );
        cs
    }

    fn arbitrary_dereferenced() -> impl Strategy<Value = Dereferenced> {
        let secret_keys =
            proptest::collection::btree_map(arbitrary_name(), proptest::bool::ANY, 0..3).prop_map(
                |m| {
                    let mut k = SecretKeys::default();
                    for (name, empty) in m {
                        k.insert(&name, empty);
                    }
                    k
                },
            );
        (
            proptest::option::of(arbitrary_lookup(arbitrary_config())),
            proptest::option::of(proptest::collection::btree_map(
                arbitrary_name(),
                arbitrary_lookup(secret_keys),
                0..4,
            )),
            proptest::option::of(arbitrary_lookup((
                arbitrary_spec(),
                proptest::option::of(arbitrary_config()),
            ))),
        )
            .prop_map(|(config_map, secrets, baseline)| Dereferenced {
                config_map,
                secrets,
                baseline: baseline.map(|l| match l {
                    Lookup::Found((spec, config_map)) => Lookup::Found(Baseline {
                        resource: from_spec(spec, "prd"),
                        config_map,
                    }),
                    Lookup::NotFound => Lookup::NotFound,
                    Lookup::Forbidden(m) => Lookup::Forbidden(m),
                }),
            })
    }

    proptest! {
        #[test]
        fn evaluate_never_panics_and_every_problem_says_what_to_do(
            spec in arbitrary_spec(),
            read in arbitrary_dereferenced(),
        ) {
            let cs = from_spec(spec, "stg");
            let v = evaluate(&cs, &read);
            for p in v.all_problems() {
                prop_assert!(!p.key.is_empty(), "{}", p);
                prop_assert!(!p.message.is_empty(), "{}", p);
                prop_assert!(!p.fix.is_empty(), "{}", p);
                prop_assert_eq!(p.environment, cs.spec.environment);
            }
            let _ = v.blocks_rollout();
        }

        #[test]
        fn a_configuration_compared_with_itself_is_always_in_parity(
            spec in arbitrary_spec(),
            config_map in proptest::option::of(arbitrary_config()),
            env in proptest::sample::select(vec!["development", "staging"]),
        ) {
            let mut spec = spec;
            spec["environment"] = serde_json::json!(env);
            spec["parity"] = serde_json::json!({"baseline": {"name": "itself", "namespace": "prd"}});
            let mut baseline_spec = spec.clone();
            baseline_spec["environment"] = serde_json::json!("production");
            baseline_spec.as_object_mut().unwrap().remove("parity");
            let read = Dereferenced {
                config_map: config_map.clone().map(Lookup::Found),
                secrets: None,
                baseline: Some(Lookup::Found(Baseline {
                    resource: from_spec(baseline_spec, "prd"),
                    config_map: config_map.clone(),
                })),
            };
            let mut cs = from_spec(spec, "stg");
            if config_map.is_some() {
                cs.spec.config_map_ref = Some(crate::crd::LocalObjectName { name: "cm".into() });
                let Some(Lookup::Found(mut b)) = read.baseline.clone() else { unreachable!() };
                b.resource.spec.config_map_ref = cs.spec.config_map_ref.clone();
                let read = Dereferenced { baseline: Some(Lookup::Found(b)), ..read };
                let parity = evaluate(&cs, &read).parity.expect("parity is checked");
                prop_assert!(parity.problems.is_empty(), "{:?}", parity.problems);
            } else {
                let parity = evaluate(&cs, &read).parity.expect("parity is checked");
                prop_assert!(parity.problems.is_empty(), "{:?}", parity.problems);
            }
        }
    }
}
