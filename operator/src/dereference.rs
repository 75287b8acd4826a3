//! Reads what a `ChatService` points at — its Secrets, its ConfigMap and its
//! production baseline — and nothing else, so validation can be a pure function.
//!
//! Only what validation needs is kept: of a Secret, the names of its keys (never a
//! value); of a ConfigMap, its data (configuration, not secret); of the baseline,
//! the resource itself and its ConfigMap. The baseline's Secrets are not read: parity
//! compares references, not secret values.
//!
//! Every read is a `get` of one named object in the namespace the spec names, which
//! is why the operator needs `get` on `secrets` and `configmaps` but never reads a
//! Secret the spec does not reference.

use crate::configuration::declared_config;
use crate::crd::{ChatService, ChatServiceSpec};
use chatgate_contract::Environment;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use kube::{Client, ResourceExt};
use std::collections::{BTreeMap, BTreeSet};

/// The outcome of reading one referenced object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<T> {
    Found(T),
    NotFound,
    /// The operator may not read it (RBAC); the text is the API server's message.
    Forbidden(String),
}

impl<T> Lookup<T> {
    pub fn found(&self) -> Option<&T> {
        match self {
            Lookup::Found(t) => Some(t),
            Lookup::NotFound | Lookup::Forbidden(_) => None,
        }
    }
}

/// What a Secret holds, as far as validation cares: key names and URL schemes,
/// never values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretKeys {
    /// Every key of the Secret.
    pub keys: BTreeSet<String>,
    /// Keys whose value is empty (an empty API key is as missing as no key).
    pub empty: BTreeSet<String>,
    /// The scheme of each value that is a URL (`postgres`, `sqlite`): not secret,
    /// and what tells a shared database from one inside each pod.
    pub schemes: BTreeMap<String, String>,
    /// The Secret's `resourceVersion`: it changes whenever a value does, so the pods
    /// can roll on a rotation without the operator keeping (or hashing) any value.
    pub version: Option<String>,
}

impl SecretKeys {
    /// Key names of a Secret as the API server returns it (`data`; `stringData` is
    /// write-only and already merged into `data` by the server).
    pub fn of_secret(secret: &Secret) -> SecretKeys {
        let mut out = SecretKeys {
            version: secret.metadata.resource_version.clone(),
            ..SecretKeys::default()
        };
        for (key, ByteString(value)) in secret.data.iter().flatten() {
            out.insert_value(key, value);
        }
        // A Secret built offline (a manifest) may still carry stringData.
        for (key, value) in secret.string_data.iter().flatten() {
            out.insert_value(key, value.as_bytes());
        }
        out
    }

    /// Records a key from its value, keeping only whether it is empty and its scheme.
    pub fn insert_value(&mut self, key: &str, value: &[u8]) {
        self.insert(key, value.is_empty());
        let scheme = std::str::from_utf8(value)
            .ok()
            .and_then(chatgate_contract::config::url_scheme);
        match scheme {
            Some(scheme) => self.schemes.insert(key.to_string(), scheme.to_string()),
            None => self.schemes.remove(key),
        };
    }

    pub fn insert(&mut self, key: &str, empty: bool) {
        self.keys.insert(key.to_string());
        if empty {
            self.empty.insert(key.to_string());
        } else {
            self.empty.remove(key);
        }
    }
}

/// The production baseline as read for parity.
#[derive(Debug, Clone)]
pub struct Baseline {
    pub resource: ChatService,
    /// Data of the baseline's `spec.configMapRef`, when it has one and it was read.
    pub config_map: Option<BTreeMap<String, String>>,
}

/// Everything validation looks at besides the ChatService itself.
#[derive(Debug, Clone, Default)]
pub struct Dereferenced {
    /// `spec.configMapRef`'s data; `None` when the spec names no ConfigMap or it was
    /// not looked up (offline, without ConfigMaps among the inputs).
    pub config_map: Option<Lookup<BTreeMap<String, String>>>,
    /// Each referenced Secret by name (in the ChatService's namespace). `None` when
    /// Secrets were not looked up at all (offline without Secret sources); a name
    /// missing from the map is treated as not found.
    pub secrets: Option<BTreeMap<String, Lookup<SecretKeys>>>,
    /// The baseline named in `spec.parity`; `None` when there is nothing to compare
    /// (no `spec.parity`, or a production resource).
    pub baseline: Option<Lookup<Baseline>>,
}

/// Names of the Secrets the spec references, from the same mapping the pods get.
pub fn referenced_secrets(spec: &ChatServiceSpec) -> BTreeSet<String> {
    let (config, _) = declared_config(spec, None);
    config
        .secret_refs()
        .map(|(_, secret, _)| secret.to_string())
        .collect()
}

/// Whether ChatServices in `reader_namespace` may use `baseline` as their parity
/// baseline: always from its own namespace, from another only when the baseline's
/// [`crate::meta::ANNOTATION_BASELINE_READABLE_FROM`] names that namespace (or `*`).
pub fn baseline_readable_from(
    baseline: &ChatService,
    baseline_namespace: &str,
    reader_namespace: &str,
) -> bool {
    if baseline_namespace == reader_namespace {
        return true;
    }
    baseline
        .annotations()
        .get(crate::meta::ANNOTATION_BASELINE_READABLE_FROM)
        .is_some_and(|list| {
            list.split(',')
                .map(str::trim)
                .any(|ns| ns == "*" || ns == reader_namespace)
        })
}

/// Where the baseline of a ChatService is, as (namespace, name), when it has one.
/// The namespace defaults to the ChatService's own.
pub fn baseline_of(cs: &ChatService) -> Option<(String, String)> {
    let parity = cs.spec.parity.as_ref()?;
    if cs.spec.environment == Environment::Production {
        return None;
    }
    let namespace = parity
        .baseline
        .namespace
        .clone()
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| cs.namespace().unwrap_or_default());
    Some((namespace, parity.baseline.name.clone()))
}

/// Reads every object the ChatService references. API errors other than "not
/// found" and "forbidden" are returned, so the reconcile is retried.
pub async fn read(client: &Client, cs: &ChatService) -> Result<Dereferenced, kube::Error> {
    let namespace = cs.namespace().unwrap_or_default();

    let config_map = match &cs.spec.config_map_ref {
        Some(r) => Some(read_config_map(client, &namespace, &r.name).await?),
        None => None,
    };

    let secrets_api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let mut secrets = BTreeMap::new();
    for name in referenced_secrets(&cs.spec) {
        let lookup = lookup(secrets_api.get_opt(&name).await)?;
        // Only the key names are kept; the values are dropped here.
        secrets.insert(name, map_found(lookup, |s| SecretKeys::of_secret(&s)));
    }

    let baseline = match baseline_of(cs) {
        Some((ns, name)) => {
            let api: Api<ChatService> = Api::namespaced(client.clone(), &ns);
            Some(match lookup(api.get_opt(&name).await)? {
                Lookup::Found(resource) => {
                    // Nothing more of a baseline that has not opted in is read;
                    // validation says why it was refused.
                    let readable = baseline_readable_from(&resource, &ns, &namespace);
                    let config_map = match &resource.spec.config_map_ref {
                        Some(r) if readable => read_config_map(client, &ns, &r.name)
                            .await?
                            .found()
                            .cloned(),
                        _ => None,
                    };
                    Lookup::Found(Baseline {
                        resource,
                        config_map,
                    })
                }
                Lookup::NotFound => Lookup::NotFound,
                Lookup::Forbidden(m) => Lookup::Forbidden(m),
            })
        }
        None => None,
    };

    Ok(Dereferenced {
        config_map,
        secrets: Some(secrets),
        baseline,
    })
}

async fn read_config_map(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Lookup<BTreeMap<String, String>>, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    Ok(map_found(lookup(api.get_opt(name).await)?, |cm| {
        cm.data.unwrap_or_default()
    }))
}

fn map_found<T, U>(l: Lookup<T>, f: impl FnOnce(T) -> U) -> Lookup<U> {
    match l {
        Lookup::Found(t) => Lookup::Found(f(t)),
        Lookup::NotFound => Lookup::NotFound,
        Lookup::Forbidden(m) => Lookup::Forbidden(m),
    }
}

/// `get_opt` already maps 404 to `None`; a 403 becomes a finding, not an error,
/// because retrying will not fix RBAC and the status should say so.
fn lookup<T>(result: Result<Option<T>, kube::Error>) -> Result<Lookup<T>, kube::Error> {
    match result {
        Ok(Some(t)) => Ok(Lookup::Found(t)),
        Ok(None) => Ok(Lookup::NotFound),
        Err(kube::Error::Api(e)) if e.code == 403 => Ok(Lookup::Forbidden(e.message)),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_keys_keep_names_and_flag_empty_values() {
        let s = Secret {
            data: Some(
                [
                    ("api-key".to_string(), ByteString(b"sk-1".to_vec())),
                    ("blank".to_string(), ByteString(Vec::new())),
                ]
                .into(),
            ),
            string_data: Some([("extra".to_string(), "x".to_string())].into()),
            ..Default::default()
        };
        let k = SecretKeys::of_secret(&s);
        assert_eq!(
            k.keys,
            ["api-key", "blank", "extra"].map(String::from).into()
        );
        assert_eq!(k.empty, ["blank"].map(String::from).into());
    }

    fn cs(yaml: &str) -> ChatService {
        serde_norway::from_str(yaml).expect("test ChatService parses")
    }

    #[test]
    fn baseline_namespace_defaults_to_own_and_production_has_none() {
        let staging = cs(
            "apiVersion: chatgate.dev/v1alpha1\nkind: ChatService\nmetadata: {name: s, namespace: stg}\nspec:\n  image: x\n  environment: staging\n  parity: {baseline: {name: prod}}\n",
        );
        assert_eq!(
            baseline_of(&staging),
            Some(("stg".to_string(), "prod".to_string()))
        );
        let elsewhere = cs(
            "apiVersion: chatgate.dev/v1alpha1\nkind: ChatService\nmetadata: {name: s, namespace: stg}\nspec:\n  image: x\n  environment: staging\n  parity: {baseline: {name: prod, namespace: prd}}\n",
        );
        assert_eq!(
            baseline_of(&elsewhere),
            Some(("prd".to_string(), "prod".to_string()))
        );
        let production = cs(
            "apiVersion: chatgate.dev/v1alpha1\nkind: ChatService\nmetadata: {name: p, namespace: prd}\nspec:\n  image: x\n  environment: production\n  replicas: 2\n  parity: {baseline: {name: other}}\n",
        );
        assert_eq!(baseline_of(&production), None);
    }

    #[test]
    fn referenced_secrets_are_every_secret_ref_of_the_spec() {
        let c = cs(
            "apiVersion: chatgate.dev/v1alpha1\nkind: ChatService\nmetadata: {name: s}\nspec:\n  image: x\n  environment: staging\n  jwt: {secretRef: {name: jwt, key: k}}\n  llm: {provider: openai, apiKeySecretRef: {name: llm, key: api-key}}\n  database: {urlSecretRef: {name: db, key: url}}\n",
        );
        assert_eq!(
            referenced_secrets(&c.spec),
            ["db", "jwt", "llm"].map(String::from).into()
        );
    }
}
