//! The service configuration a `ChatService` declares, as the contract's `ConfigSet`.
//!
//! Both the operator's rollout validation and the offline `validate` command go
//! through [`declared_config`], so they see exactly the keys the pods will get.

use crate::crd::{ChatServiceSpec, SecretKeyRef};
use chatgate_contract::config::{ConfigSet, ConfigValue, Key, Problem, ProblemKind};
use std::collections::BTreeMap;

/// Keys the operator sets from structured spec fields; writing them in `spec.config`
/// or the ConfigMap would silently fight the structured field, so it is refused.
pub const STRUCTURED_KEYS: &[(Key, &str)] = &[
    (Key::Env, "spec.environment"),
    (Key::Listen, "(set by the operator)"),
    (Key::TerminationLog, "(set by the operator)"),
    (Key::JwtAlgorithm, "spec.jwt.algorithm"),
    (Key::JwtSecret, "spec.jwt.secretRef"),
    (Key::JwtPublicKey, "spec.jwt.publicKeyRef"),
    (Key::JwtIssuer, "spec.jwt.issuer"),
    (Key::JwtAudience, "spec.jwt.audience"),
    (Key::JwtLeewaySeconds, "spec.jwt.leewaySeconds"),
    (Key::DatabaseUrl, "spec.database"),
    (Key::LlmProvider, "spec.llm.provider"),
    (Key::LlmApiKey, "spec.llm.apiKeySecretRef"),
    (Key::LlmBaseUrl, "spec.llm.baseUrl"),
    (Key::LlmModel, "spec.llm.model"),
    (Key::DrainSeconds, "spec.rollout.drainSeconds"),
    (Key::StartupBudgetSeconds, "spec.startup.budgetSeconds"),
];

fn secret(r: &SecretKeyRef) -> ConfigValue {
    ConfigValue::SecretRef {
        secret: r.name.clone(),
        key: r.key.clone(),
    }
}

/// The configuration the pods of this spec will run with, plus problems that come
/// from how the spec spells it (a structured key written as a free-form key).
///
/// `config_map` is the data of `spec.configMapRef`, when it was read.
pub fn declared_config(
    spec: &ChatServiceSpec,
    config_map: Option<&BTreeMap<String, String>>,
) -> (ConfigSet, Vec<Problem>) {
    let mut c = ConfigSet::new();
    let mut problems = Vec::new();

    // Free-form keys first, so structured fields win if both are present.
    let sources = [
        ("spec.config", Some(&spec.config)),
        ("spec.configMapRef", config_map),
    ];
    for (source, map) in sources {
        for (key, value) in map.into_iter().flatten() {
            if let Some((_, field)) = STRUCTURED_KEYS.iter().find(|(k, _)| k == key) {
                problems.push(Problem::new(
                    key,
                    spec.environment,
                    ProblemKind::Invalid,
                    format!("is set in {source}, but the operator sets it from {field}"),
                    format!("remove it from {source} and use {field}"),
                ));
                continue;
            }
            c.set_literal(key.clone(), value.clone());
        }
    }

    c.set_literal(Key::Env, spec.environment.as_str());
    c.set_literal(Key::JwtAlgorithm, spec.jwt.algorithm.as_str());
    if let Some(v) = &spec.jwt.issuer {
        c.set_literal(Key::JwtIssuer, v.clone());
    }
    if let Some(v) = &spec.jwt.audience {
        c.set_literal(Key::JwtAudience, v.clone());
    }
    if let Some(r) = &spec.jwt.secret_ref {
        c.set(Key::JwtSecret, secret(r));
    }
    if let Some(r) = &spec.jwt.public_key_ref {
        c.set(Key::JwtPublicKey, secret(r));
    }
    if let Some(v) = spec.jwt.leeway_seconds {
        c.set_literal(Key::JwtLeewaySeconds, v.to_string());
    }
    if let Some(v) = &spec.database.url {
        c.set_literal(Key::DatabaseUrl, v.clone());
    }
    if let Some(r) = &spec.database.url_secret_ref {
        c.set(Key::DatabaseUrl, secret(r));
    }
    c.set_literal(Key::LlmProvider, spec.llm.provider.as_str());
    if let Some(r) = &spec.llm.api_key_secret_ref {
        c.set(Key::LlmApiKey, secret(r));
    }
    if let Some(v) = &spec.llm.base_url {
        c.set_literal(Key::LlmBaseUrl, v.clone());
    }
    if let Some(v) = &spec.llm.model {
        c.set_literal(Key::LlmModel, v.clone());
    }
    c.set_literal(Key::DrainSeconds, spec.rollout.drain_seconds.to_string());
    c.set_literal(
        Key::StartupBudgetSeconds,
        spec.startup.budget_seconds.to_string(),
    );
    (c, problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatgate_contract::config::Origin;

    fn spec(yaml: &str) -> ChatServiceSpec {
        serde_norway::from_str(yaml).expect("test spec parses")
    }

    #[test]
    fn minimal_development_spec_is_valid() {
        let s = spec("image: chatgate:dev\nenvironment: development\n");
        let (c, p) = declared_config(&s, None);
        assert!(p.is_empty());
        assert_eq!(c.validate(Origin::Manifest), vec![]);
    }

    #[test]
    fn structured_key_in_free_form_config_is_refused() {
        let s =
            spec("image: x\nenvironment: development\nconfig:\n  CHATGATE_JWT_ALGORITHM: RS256\n");
        let (c, p) = declared_config(&s, None);
        assert_eq!(p.len(), 1);
        assert!(p[0].fix.contains("spec.jwt.algorithm"));
        assert_eq!(c.effective(Key::JwtAlgorithm), Some("HS256"));
    }

    #[test]
    fn staging_openai_without_key_names_the_key() {
        let s = spec(
            "image: x\nenvironment: staging\nllm:\n  provider: openai\njwt:\n  issuer: i\n  audience: a\n  secretRef: {name: jwt, key: secret}\ndatabase:\n  urlSecretRef: {name: db, key: url}\n",
        );
        let (c, _) = declared_config(&s, None);
        let p = c.validate(Origin::Manifest);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, Key::LlmApiKey);
    }
}
