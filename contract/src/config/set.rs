//! A configuration (key → value) and the two questions asked of it: is it valid for
//! its environment, and does it keep the parity rules against its production baseline.

use super::closest::closest;
use super::keys::{KEY_PREFIX, KEYS, Key, KeySpec, ParityRule};
use super::value::{Shown, url_scheme};
use super::{Environment, JwtAlgorithm, Problem, ProblemKind};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Outside development a ChatService runs several replicas, which must share one
/// database: SQLite keeps each pod's threads inside that pod. Checked wherever the
/// URL's scheme is known — the service's own environment, a manifest's literal, or
/// the Secret the operator and `validate` read.
pub fn shared_database_problem(env: Environment, scheme: &str) -> Option<Problem> {
    if env == Environment::Development || !scheme.eq_ignore_ascii_case("sqlite") {
        return None;
    }
    Some(Problem::new(
        Key::DatabaseUrl,
        env,
        ProblemKind::Invalid,
        format!(
            "uses SQLite, which keeps each pod's threads inside that pod; {env} runs two or more replicas that must share one database"
        ),
        "point it at PostgreSQL (postgres://USER:PASSWORD@HOST:PORT/DATABASE), the database every replica shares; SQLite is for development",
    ))
}

/// Where a key's value comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ConfigValue {
    /// The value itself.
    Literal(String),
    /// A key of a Kubernetes Secret (resolved by the kubelet into the env var).
    SecretRef { secret: String, key: String },
}

/// Where a configuration was read from, which changes what is acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A process environment: secrets arrive as plain values.
    Process,
    /// A manifest (ChatService): secrets must be Secret references outside development.
    Manifest,
}

/// Which keys a non-production configuration may let differ from production.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParityPolicy {
    pub allowed_differences: BTreeSet<String>,
}

/// A configuration: key → where its value comes from. Keys are the `CHATGATE_*`
/// names; absent keys take their defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSet {
    pub values: BTreeMap<String, ConfigValue>,
}

impl ConfigSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads every `CHATGATE_*` variable (unknown ones too, so they are reported).
    pub fn from_env_vars<I, K, V>(vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut set = ConfigSet::new();
        for (k, v) in vars {
            let k = k.into();
            if k.starts_with(KEY_PREFIX) {
                set.values.insert(k, ConfigValue::Literal(v.into()));
            }
        }
        set
    }

    pub fn set(&mut self, key: impl Into<String>, value: ConfigValue) -> &mut Self {
        self.values.insert(key.into(), value);
        self
    }

    pub fn set_literal(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.set(key, ConfigValue::Literal(value.into()))
    }

    pub fn get(&self, key: impl AsRef<str>) -> Option<&ConfigValue> {
        self.values.get(key.as_ref())
    }

    /// The literal value, or the schema default when unset. `None` for unset keys
    /// without a default and for Secret references (whose value is not known here).
    pub fn effective(&self, key: impl AsRef<str>) -> Option<&str> {
        let key = key.as_ref();
        match self.values.get(key) {
            Some(ConfigValue::Literal(v)) => Some(v.as_str()),
            Some(ConfigValue::SecretRef { .. }) => None,
            None => Key::lookup(key).and_then(|k| k.spec().default),
        }
    }

    /// Whether the key is set explicitly (literal or reference). Defaults do not
    /// count: "required" and "present" are about what an environment declares.
    fn has_value(&self, spec: &KeySpec) -> bool {
        match self.get(spec.key) {
            Some(ConfigValue::Literal(v)) => !v.trim().is_empty(),
            Some(ConfigValue::SecretRef { .. }) => true,
            None => false,
        }
    }

    /// The environment the configuration declares (`CHATGATE_ENV`).
    pub fn environment(&self) -> Result<Environment, Problem> {
        let raw = self
            .effective(Key::Env)
            .unwrap_or(Environment::DEFAULT.as_str());
        raw.parse().map_err(|e: String| {
            Problem::new(
                Key::Env,
                Environment::DEFAULT,
                ProblemKind::Invalid,
                e,
                format!("set {} to development, staging or production", Key::Env),
            )
        })
    }

    /// Every Secret reference, as (key, secret name, secret key).
    pub fn secret_refs(&self) -> impl Iterator<Item = (&str, &str, &str)> {
        self.values.iter().filter_map(|(k, v)| match v {
            ConfigValue::SecretRef { secret, key } => {
                Some((k.as_str(), secret.as_str(), key.as_str()))
            }
            ConfigValue::Literal(_) => None,
        })
    }

    /// Checks every key at once and returns every problem found (empty = valid).
    pub fn validate(&self, origin: Origin) -> Vec<Problem> {
        let mut problems = Vec::new();
        let env = match self.environment() {
            Ok(env) => env,
            Err(p) => {
                problems.push(p);
                Environment::Development
            }
        };

        for key in self.values.keys() {
            if Key::lookup(key).is_none() {
                let hint = closest_key(key)
                    .map(|k| format!("did you mean {k}? Run `--explain {k}`"))
                    .unwrap_or_else(|| "remove it; `--explain` lists the known keys".into());
                problems.push(Problem::new(
                    key,
                    env,
                    ProblemKind::Unknown,
                    "is not a chatgate configuration key",
                    hint,
                ));
            }
        }

        for spec in KEYS {
            let value = self.get(spec.key);
            match value {
                Some(ConfigValue::Literal(v)) => {
                    let shown = if spec.secret {
                        Shown::Withheld
                    } else {
                        Shown::Quoted
                    };
                    if let Err(e) = spec.kind.check(v, shown) {
                        problems.push(Problem::new(
                            spec.key,
                            env,
                            ProblemKind::Invalid,
                            e,
                            format!("set it to {}", spec.kind.describe()),
                        ));
                    } else if spec.secret
                        && origin == Origin::Manifest
                        && env != Environment::Development
                    {
                        problems.push(Problem::new(
                            spec.key,
                            env,
                            ProblemKind::SecretInline,
                            "is a secret written inline in the manifest",
                            "put it in a Secret and reference it",
                        ));
                    }
                }
                Some(ConfigValue::SecretRef { secret, key })
                    if secret.trim().is_empty() || key.trim().is_empty() =>
                {
                    problems.push(Problem::new(
                        spec.key,
                        env,
                        ProblemKind::Invalid,
                        "Secret reference needs both a Secret name and a key",
                        "set the Secret's name and key",
                    ));
                }
                Some(ConfigValue::SecretRef { .. }) | None => {}
            }
            if self.is_required(spec, env) && !self.has_value(spec) {
                let reason = match spec.required_when {
                    Some((other, _)) => format!(
                        "is required in {env} when {other} is {}",
                        self.effective(other).unwrap_or("set")
                    ),
                    None => format!("is required in {env}"),
                };
                let fix = if spec.secret {
                    "reference a Secret key that holds it".to_string()
                } else {
                    "set it".to_string()
                };
                problems.push(Problem::new(
                    spec.key,
                    env,
                    ProblemKind::Required,
                    reason,
                    fix,
                ));
            }
        }

        self.cross_key_checks(env, &mut problems);
        problems
    }

    fn is_required(&self, spec: &KeySpec, env: Environment) -> bool {
        if !spec.required_in.contains(&env) {
            return false;
        }
        match spec.required_when {
            None => true,
            Some((other, values)) => self
                .effective(other)
                .is_some_and(|v| values.contains(&v.trim())),
        }
    }

    fn cross_key_checks(&self, env: Environment, problems: &mut Vec<Problem>) {
        if let Some(ConfigValue::Literal(url)) = self.get(Key::DatabaseUrl)
            && let Some(problem) = url_scheme(url).and_then(|s| shared_database_problem(env, s))
        {
            problems.push(problem);
        }
        let alg = self
            .effective(Key::JwtAlgorithm)
            .unwrap_or(JwtAlgorithm::DEFAULT.as_str())
            .trim();
        let algorithm = alg.parse::<JwtAlgorithm>().ok();
        if matches!(algorithm, Some(JwtAlgorithm::RS256 | JwtAlgorithm::ES256)) {
            let has = |k: Key| self.values.contains_key(k.as_str());
            if !has(Key::JwtPublicKey) && !has(Key::JwtJwksFile) {
                problems.push(Problem::new(
                    Key::JwtPublicKey,
                    env,
                    ProblemKind::Required,
                    format!(
                        "is required when {} is {alg} (or {})",
                        Key::JwtAlgorithm,
                        Key::JwtJwksFile
                    ),
                    "set a PEM public key or a JWKS file path",
                ));
            }
        }
        if algorithm == Some(JwtAlgorithm::HS256)
            && env != Environment::Development
            && let Some(ConfigValue::Literal(secret)) = self.get(Key::JwtSecret)
            && !secret.trim().is_empty()
            && secret.len() < 32
        {
            problems.push(Problem::new(
                Key::JwtSecret,
                env,
                ProblemKind::Invalid,
                format!(
                    "is {} bytes; HS256 needs at least 32 in {env}",
                    secret.len()
                ),
                "use a longer random secret (e.g. `openssl rand -base64 48`)",
            ));
        }
    }

    /// Compares this (non-production) configuration with its production baseline
    /// key by key and returns every difference the rules forbid.
    pub fn parity_with(&self, baseline: &ConfigSet, policy: &ParityPolicy) -> Vec<Problem> {
        let env = self.environment().unwrap_or_default();
        let mut problems = Vec::new();
        for allowed in &policy.allowed_differences {
            if Key::lookup(allowed).is_none() {
                problems.push(Problem::new(
                    allowed,
                    env,
                    ProblemKind::Unknown,
                    "is listed as allowed to differ but is not a chatgate configuration key",
                    "remove it from the allowed differences",
                ));
            }
        }
        for spec in KEYS {
            if policy.allowed_differences.contains(spec.key.as_str()) {
                continue;
            }
            match spec.parity {
                ParityRule::Free => {}
                ParityRule::Present => match (self.has_value(spec), baseline.has_value(spec)) {
                    (false, true) => problems.push(Problem::new(
                        spec.key,
                        env,
                        ProblemKind::ParityPresent,
                        format!("is set in production but missing in {env}"),
                        format!("set it in {env} (values may differ), or allow it to differ"),
                    )),
                    (true, false) => problems.push(Problem::new(
                        spec.key,
                        env,
                        ProblemKind::ParityPresent,
                        format!("is set in {env} but missing in production"),
                        "set it in production too, or allow it to differ",
                    )),
                    _ => {}
                },
                ParityRule::Match => {
                    let mine = self.comparable(spec);
                    let theirs = baseline.comparable(spec);
                    if mine != theirs {
                        let show =
                            |v: &Option<String>| v.clone().unwrap_or_else(|| "(unset)".into());
                        problems.push(Problem::new(
                            spec.key,
                            env,
                            ProblemKind::ParityMatch,
                            format!(
                                "is `{}` in {env} but `{}` in production",
                                show(&mine),
                                show(&theirs)
                            ),
                            "make it equal to production, or allow it to differ",
                        ));
                    }
                }
            }
        }
        problems
    }

    /// The value compared under `match`: normalised literal or default; a Secret
    /// reference compares by where it points.
    fn comparable(&self, spec: &KeySpec) -> Option<String> {
        match self.get(spec.key) {
            Some(ConfigValue::Literal(v)) => Some(spec.kind.normalize(v)),
            Some(ConfigValue::SecretRef { secret, key }) => Some(format!("secret:{secret}/{key}")),
            None => spec.default.map(|d| spec.kind.normalize(d)),
        }
    }

    /// Key → value for display, secrets redacted.
    pub fn redacted(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for spec in KEYS {
            let shown = match self.get(spec.key) {
                Some(ConfigValue::SecretRef { secret, key }) => {
                    format!("<from Secret {secret}/{key}>")
                }
                Some(ConfigValue::Literal(_)) if spec.secret => "<redacted>".to_string(),
                Some(ConfigValue::Literal(v)) => v.clone(),
                None => match spec.default {
                    Some(d) => format!("{d} (default)"),
                    None => "(unset)".to_string(),
                },
            };
            out.push((spec.key.to_string(), shown));
        }
        out
    }
}

/// The known key nearest to a misspelt one, for "did you mean".
fn closest_key(unknown: &str) -> Option<Key> {
    closest(unknown, Key::ALL)
}

#[cfg(test)]
mod tests;
