//! Writing the desired children: server-side apply with the operator's own field
//! manager, and no request at all when the live object already is what is wanted.
//!
//! "Already is" means: the live object (from the operator's watch cache) carries the
//! [`ANNOTATION_APPLIED_HASH`] of the desired object, so nothing the operator sets
//! changed, and every field the operator sets still has its value (nobody edited it
//! by hand: no drift). Fields other controllers or the API server add are ignored.

use crate::build::Desired;
use crate::meta::{ANNOTATION_APPLIED_HASH, FIELD_MANAGER};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::fmt::Debug;
use std::sync::Arc;

/// The watch caches of the operator's children (only objects labelled as managed).
#[derive(Clone)]
pub struct Stores {
    pub config_maps: Store<ConfigMap>,
    pub deployments: Store<Deployment>,
    pub services: Store<Service>,
    pub pod_disruption_budgets: Store<PodDisruptionBudget>,
    pub pods: Store<Pod>,
}

/// A write that failed, naming the object.
#[derive(Debug, thiserror::Error)]
#[error("{verb} {kind} {namespace}/{name}: {source}")]
pub struct WriteError {
    pub verb: &'static str,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    #[source]
    pub source: kube::Error,
}

/// A child's name is taken by an object this ChatService does not control. The
/// operator never takes such an object over (a forced apply would make it a child, and
/// the garbage collector would delete it with the ChatService); a person decides.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{kind} {namespace}/{name} already exists and is not controlled by ChatService {namespace}/{owner} ({controller}); the operator does not take it over: delete or rename that {kind}, or give the ChatService another name"
)]
pub struct NotOwned {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// The ChatService the child is for.
    pub owner: String,
    /// Who controls the existing object, for the message.
    pub controller: String,
}

/// Why the apply step stopped.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A request failed; retrying may help.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// A child's name is taken by someone else's object; retrying will not help.
    #[error(transparent)]
    NotOwned(#[from] NotOwned),
}

/// What the apply step produced: the Deployment as the API server has it now, and the
/// configuration hash it was applied with. Only [`apply`] makes one (its fields are
/// private to this module), so the status can never describe a Deployment that was
/// not applied as if it were.
#[derive(Debug, Clone)]
pub struct Applied {
    deployment: Arc<Deployment>,
    config_hash: String,
    writes: u32,
}

impl Applied {
    /// The Deployment as the API server returned it (or as cached, when up to date).
    pub fn deployment(&self) -> &Deployment {
        &self.deployment
    }

    /// The hash of the configuration the applied pod template carries.
    pub fn config_hash(&self) -> &str {
        &self.config_hash
    }

    /// Requests sent (0 when everything was up to date).
    pub fn writes(&self) -> u32 {
        self.writes
    }
}

/// Whether `desired` must be applied over `live`.
pub fn needs_write<K: Resource + Serialize>(live: Option<&K>, desired: &K) -> bool {
    let Some(live) = live else { return true };
    let hash = |o: &K| {
        o.meta()
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_APPLIED_HASH))
            .cloned()
    };
    if hash(live).is_none() || hash(live) != hash(desired) {
        return true;
    }
    match (serde_json::to_value(desired), serde_json::to_value(live)) {
        (Ok(d), Ok(l)) => !is_subset(&d, &l),
        _ => true,
    }
}

/// Every field of `desired` is in `live` with the same value (lists: same length,
/// element by element). Extra fields in `live` (defaults, other managers) are fine.
pub fn is_subset(desired: &Value, live: &Value) -> bool {
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => d
            .iter()
            .all(|(k, dv)| l.get(k).is_some_and(|lv| is_subset(dv, lv))),
        (Value::Array(d), Value::Array(l)) => {
            d.len() == l.len() && d.iter().zip(l).all(|(a, b)| is_subset(a, b))
        }
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        _ => desired == live,
    }
}

/// Applies every child that is not up to date and deletes a PodDisruptionBudget that
/// is no longer wanted.
///
/// The ConfigMap goes first: the pods of the Deployment read it. The Deployment,
/// Service and PodDisruptionBudget then go at once, each a read (when the cache does
/// not show it up to date) and a write, so a new ChatService waits for two round trips instead of six. All
/// three run to the end; the first failure in that order is the one reported.
pub async fn apply(
    client: &Client,
    stores: &Stores,
    desired: &Desired,
) -> Result<Applied, ApplyError> {
    let (_, config_map_writes) =
        apply_one(client, &stores.config_maps, &desired.config_map).await?;
    let pod_disruption_budget = async {
        match &desired.pod_disruption_budget {
            Some(pdb) => apply_one(client, &stores.pod_disruption_budgets, pdb)
                .await
                .map(|(_, writes)| writes),
            None => {
                // The PDB would have the Deployment's name and namespace.
                let name = desired.deployment.name_any();
                let namespace = desired.deployment.namespace().unwrap_or_default();
                let live = stores
                    .pod_disruption_budgets
                    .get(&ObjectRef::<PodDisruptionBudget>::new(&name).within(&namespace));
                match live.filter(|l| owned_by_same(l.as_ref(), &desired.deployment)) {
                    Some(live) => Ok(delete(client, live.as_ref()).await?),
                    None => Ok(0),
                }
            }
        }
    };
    let (deployment, service, pod_disruption_budget) = futures::join!(
        apply_one(client, &stores.deployments, &desired.deployment),
        apply_one(client, &stores.services, &desired.service),
        pod_disruption_budget,
    );
    let (deployment, deployment_writes) = deployment?;
    let (_, service_writes) = service?;
    let pod_disruption_budget_writes = pod_disruption_budget?;
    Ok(Applied {
        deployment,
        config_hash: desired.config_hash.clone(),
        writes: config_map_writes
            + deployment_writes
            + service_writes
            + pod_disruption_budget_writes,
    })
}

/// Refuses an existing object with the child's name that the child's owner does not
/// control. `desired` carries the owner reference to the ChatService.
pub fn check_owned<K: Resource<DynamicType = ()>>(live: &K, desired: &K) -> Result<(), NotOwned> {
    if owned_by_same(live, desired) {
        return Ok(());
    }
    let controller = controller_of(live)
        .map(|o| format!("controlled by {} {}", o.kind, o.name))
        .unwrap_or_else(|| "it has no controller".to_owned());
    let owner = controller_of(desired)
        .map(|o| o.name.clone())
        .unwrap_or_default();
    Err(NotOwned {
        kind: K::kind(&()).into_owned(),
        namespace: desired.namespace().unwrap_or_default(),
        name: desired.name_any(),
        owner,
        controller,
    })
}

/// The owner reference marked as the object's controller, if any.
fn controller_of<K: Resource>(object: &K) -> Option<&OwnerReference> {
    object
        .meta()
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
}

/// Both objects name the same controller (so only the operator's own PDB is deleted).
fn owned_by_same<A: Resource, B: Resource>(a: &A, b: &B) -> bool {
    let ua = controller_of(a).map(|o| &o.uid);
    ua.is_some() && ua == controller_of(b).map(|o| &o.uid)
}

/// Applies `desired` unless the live object already is it: the object as the API
/// server has it now, and the writes sent (0 or 1).
async fn apply_one<K>(
    client: &Client,
    store: &Store<K>,
    desired: &K,
) -> Result<(Arc<K>, u32), ApplyError>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let namespace = desired.namespace().unwrap_or_default();
    let name = desired.name_any();
    let api: Api<K> = Api::namespaced(client.clone(), &namespace);
    if let Some(cached) = store.get(&ObjectRef::from_obj(desired)) {
        check_owned(cached.as_ref(), desired)?;
        if !needs_write(Some(cached.as_ref()), desired) {
            return Ok((cached, 0));
        }
    }
    // The cache holds only objects labelled as managed, so one it lacks may still exist
    // under the child's name; and while a watch lists again after an expiry, the cache
    // can lag behind this operator's own last write. So before anything is written the
    // API server is asked: a write goes out only for a real difference.
    let live = api
        .get_opt(&name)
        .await
        .map_err(|source| WriteError {
            verb: "reading",
            kind: K::kind(&()).into_owned(),
            namespace: namespace.clone(),
            name: name.clone(),
            source,
        })?
        .map(Arc::new);
    if let Some(live) = &live {
        check_owned(live.as_ref(), desired)?;
    }
    if let Some(live) = live.filter(|l| !needs_write(Some(l.as_ref()), desired)) {
        return Ok((live, 0));
    }
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(desired),
    )
    .await
    .map(|applied| (Arc::new(applied), 1))
    .map_err(|source| {
        WriteError {
            verb: "applying",
            kind: K::kind(&()).into_owned(),
            namespace,
            name,
            source,
        }
        .into()
    })
}

/// Deletes `live` (only that object: its uid is a precondition); the writes sent.
async fn delete<K>(client: &Client, live: &K) -> Result<u32, WriteError>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + DeserializeOwned,
{
    let namespace = live.namespace().unwrap_or_default();
    let name = live.name_any();
    let api: Api<K> = Api::namespaced(client.clone(), &namespace);
    let uid = live.meta().uid.clone();
    let params = DeleteParams {
        preconditions: uid.map(|uid| kube::api::Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(&name, &params).await {
        Ok(_) => Ok(1),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(1),
        Err(source) => Err(WriteError {
            verb: "deleting",
            kind: K::kind(&()).into_owned(),
            namespace,
            name,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::build;
    use crate::crd::ChatService;
    use crate::validation::ValidatedSpec;
    use serde_json::json;

    fn desired() -> Desired {
        let cs = ChatService::test("chat")
            .namespace("ns")
            .stored("u", 1)
            .build();
        build(&cs, &ValidatedSpec::declared(&cs, None).0)
    }

    /// The live object as the API server returns it: the desired one plus defaults.
    fn as_served<K: Serialize + DeserializeOwned>(o: &K, extra: Value) -> K {
        let mut v = serde_json::to_value(o).unwrap();
        merge(&mut v, extra);
        serde_json::from_value(v).unwrap()
    }

    fn merge(a: &mut Value, b: Value) {
        match (a, b) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    #[test]
    fn nothing_is_written_when_the_live_object_matches() {
        let d = desired();
        let live = as_served(
            &d.deployment,
            json!({"metadata": {"resourceVersion": "7", "uid": "x", "annotations": {"deployment.kubernetes.io/revision": "1"}},
                   "spec": {"template": {"spec": {"dnsPolicy": "ClusterFirst"}}},
                   "status": {"replicas": 1}}),
        );
        assert!(!needs_write(Some(&live), &d.deployment));
        let svc = as_served(&d.service, json!({"spec": {"clusterIP": "10.0.0.7"}}));
        assert!(!needs_write(Some(&svc), &d.service));
    }

    #[test]
    fn a_missing_object_a_new_hash_or_drift_is_written() {
        let d = desired();
        assert!(needs_write(None, &d.deployment));
        let mut other = d.deployment.clone();
        other
            .annotations_mut()
            .insert(ANNOTATION_APPLIED_HASH.into(), "old".into());
        assert!(needs_write(Some(&other), &d.deployment));
        // Someone scaled it by hand: the hash still matches, the field does not.
        let drifted = as_served(&d.deployment, json!({"spec": {"replicas": 5}}));
        assert!(needs_write(Some(&drifted), &d.deployment));
        // No hash at all (created by someone else): adopt by applying.
        let mut bare = d.config_map.clone();
        bare.annotations_mut().clear();
        assert!(needs_write(Some(&bare), &d.config_map));
    }

    #[test]
    fn an_object_without_this_owner_is_never_taken_over() {
        let d = desired();
        assert_eq!(check_owned(&d.service, &d.service), Ok(()));
        let mut foreign = d.service.clone();
        foreign.metadata.owner_references = None;
        let refused = check_owned(&foreign, &d.service).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "Service ns/chat already exists and is not controlled by ChatService ns/chat (it has no controller); the operator does not take it over: delete or rename that Service, or give the ChatService another name"
        );
        let mut other = d.service.clone();
        for o in other.metadata.owner_references.iter_mut().flatten() {
            o.uid = "someone-else".into();
            o.name = "other".into();
        }
        let refused = check_owned(&other, &d.service).unwrap_err();
        assert!(
            refused.controller.contains("ChatService other"),
            "{refused}"
        );
    }

    #[test]
    fn subset_compares_lists_by_length_and_numbers_by_value() {
        assert!(is_subset(
            &json!({"a": [1, {"b": 2}]}),
            &json!({"a": [1.0, {"b": 2, "c": 3}], "d": 4})
        ));
        assert!(!is_subset(&json!({"a": [1]}), &json!({"a": [1, 2]})));
        assert!(!is_subset(&json!({"a": "x"}), &json!({})));
    }
}
