//! Which ChatServices to validate again when something they depend on changes.
//!
//! The controller watches Secrets, ConfigMaps and ChatServices besides its own
//! objects; these mappers turn a changed object into the ChatServices whose
//! validation read it, so a created Secret or a changed baseline clears or raises a
//! condition at once instead of on the next periodic resync. They only look at the
//! changed object's namespace and name, so they work as well on metadata-only
//! watches (`PartialObjectMeta<Secret>`), which keep Secret values out of the
//! operator's memory.
//!
//! ```ignore
//! let store = controller.store(); // reflector Store<ChatService>
//! let secrets = watcher(Api::<PartialObjectMeta<Secret>>::all(client.clone()), wc.clone())
//!     .touched_objects();
//! controller
//!     .watches_stream(secrets, { let store = store.clone();
//!         move |s| watches::chatservices_using_secret(&store, &s) })
//!     .watches_stream(config_maps, { let store = store.clone();
//!         move |cm| watches::chatservices_using_config_map(&store, &cm) })
//!     .watches_stream(chat_services, { let store = store.clone();
//!         move |cs| watches::chatservices_comparing_with(&store, &cs) })
//! ```

use crate::crd::ChatService;
use crate::dereference::{baseline_of, referenced_secrets};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use std::sync::Arc;

/// The ChatServices in the Secret's namespace that reference it (any key).
pub fn chatservices_using_secret<R: Resource>(
    store: &Store<ChatService>,
    secret: &R,
) -> Vec<ObjectRef<ChatService>> {
    using_secret(&store.state(), &namespace_of(secret), &secret.name_any())
}

/// The ChatServices in the ConfigMap's namespace whose `spec.configMapRef` names it,
/// and the non-production ChatServices whose baseline does (its keys enter parity).
pub fn chatservices_using_config_map<R: Resource>(
    store: &Store<ChatService>,
    config_map: &R,
) -> Vec<ObjectRef<ChatService>> {
    using_config_map(
        &store.state(),
        &namespace_of(config_map),
        &config_map.name_any(),
    )
}

/// The non-production ChatServices whose `spec.parity.baseline` is this ChatService
/// (created, changed or deleted: each changes their parity).
pub fn chatservices_comparing_with<R: Resource>(
    store: &Store<ChatService>,
    baseline: &R,
) -> Vec<ObjectRef<ChatService>> {
    comparing_with(
        &store.state(),
        &namespace_of(baseline),
        &baseline.name_any(),
    )
}

fn namespace_of<R: Resource>(r: &R) -> String {
    r.meta().namespace.clone().unwrap_or_default()
}

fn in_namespace(cs: &ChatService, namespace: &str) -> bool {
    cs.namespace().as_deref().unwrap_or_default() == namespace
}

/// Pure form of [`chatservices_using_secret`] over a snapshot of ChatServices.
pub fn using_secret(
    all: &[Arc<ChatService>],
    namespace: &str,
    name: &str,
) -> Vec<ObjectRef<ChatService>> {
    all.iter()
        .filter(|cs| in_namespace(cs, namespace) && referenced_secrets(&cs.spec).contains(name))
        .map(|cs| ObjectRef::from_obj(cs.as_ref()))
        .collect()
}

/// Pure form of [`chatservices_using_config_map`] over a snapshot of ChatServices.
pub fn using_config_map(
    all: &[Arc<ChatService>],
    namespace: &str,
    name: &str,
) -> Vec<ObjectRef<ChatService>> {
    let names_it = |cs: &ChatService| {
        cs.spec
            .config_map_ref
            .as_ref()
            .is_some_and(|r| r.name == name)
    };
    let mut out: Vec<ObjectRef<ChatService>> = Vec::new();
    for cs in all {
        if in_namespace(cs, namespace) && names_it(cs) {
            out.push(ObjectRef::from_obj(cs.as_ref()));
        }
    }
    // Users of every baseline that names the ConfigMap.
    let baselines: Vec<&Arc<ChatService>> = all
        .iter()
        .filter(|cs| in_namespace(cs, namespace) && names_it(cs))
        .collect();
    for b in baselines {
        for dependant in comparing_with(all, namespace, &b.name_any()) {
            if !out.contains(&dependant) {
                out.push(dependant);
            }
        }
    }
    out
}

/// Pure form of [`chatservices_comparing_with`] over a snapshot of ChatServices.
pub fn comparing_with(
    all: &[Arc<ChatService>],
    namespace: &str,
    name: &str,
) -> Vec<ObjectRef<ChatService>> {
    all.iter()
        .filter(|cs| baseline_of(cs).is_some_and(|(ns, n)| ns == namespace && n == name))
        .map(|cs| ObjectRef::from_obj(cs.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    use kube::api::{ObjectMeta, PartialObjectMeta};
    use kube::runtime::{reflector, watcher};

    fn cs(namespace: &str, name: &str, spec: &str) -> Arc<ChatService> {
        let yaml = format!(
            "apiVersion: chatgate.dev/v1alpha1\nkind: ChatService\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  image: x\n{spec}"
        );
        Arc::new(serde_norway::from_str(&yaml).expect("test ChatService parses"))
    }

    fn names(refs: Vec<ObjectRef<ChatService>>) -> Vec<String> {
        let mut v: Vec<String> = refs
            .into_iter()
            .map(|r| format!("{}/{}", r.namespace.unwrap_or_default(), r.name))
            .collect();
        v.sort();
        v
    }

    fn fleet() -> Vec<Arc<ChatService>> {
        vec![
            cs(
                "prd",
                "chat",
                "  environment: production\n  replicas: 2\n  llm: {provider: openai, apiKeySecretRef: {name: llm, key: api-key}}\n  configMapRef: {name: chat-config}\n",
            ),
            cs(
                "stg",
                "chat",
                "  environment: staging\n  llm: {provider: openai, apiKeySecretRef: {name: llm, key: api-key}}\n  jwt: {secretRef: {name: jwt, key: secret}}\n  parity: {baseline: {name: chat, namespace: prd}}\n",
            ),
            cs(
                "stg",
                "other",
                "  environment: staging\n  configMapRef: {name: chat-config}\n  parity: {baseline: {name: chat, namespace: prd}, mode: Warn}\n",
            ),
            cs(
                "prd",
                "sidecar",
                "  environment: development\n  parity: {baseline: {name: chat}}\n",
            ),
        ]
    }

    #[test]
    fn a_secret_maps_to_the_chatservices_in_its_namespace_that_reference_it() {
        let all = fleet();
        assert_eq!(names(using_secret(&all, "stg", "llm")), ["stg/chat"]);
        assert_eq!(names(using_secret(&all, "stg", "jwt")), ["stg/chat"]);
        assert_eq!(names(using_secret(&all, "prd", "llm")), ["prd/chat"]);
        assert!(using_secret(&all, "stg", "unrelated").is_empty());
        assert!(using_secret(&all, "elsewhere", "llm").is_empty());
    }

    #[test]
    fn a_config_map_maps_to_its_users_and_to_those_comparing_with_them() {
        let all = fleet();
        assert_eq!(
            names(using_config_map(&all, "prd", "chat-config")),
            ["prd/chat", "prd/sidecar", "stg/chat", "stg/other"]
        );
        assert_eq!(
            names(using_config_map(&all, "stg", "chat-config")),
            ["stg/other"]
        );
        assert!(using_config_map(&all, "stg", "nope").is_empty());
    }

    #[test]
    fn a_baseline_maps_to_the_non_production_chatservices_comparing_with_it() {
        let all = fleet();
        assert_eq!(
            names(comparing_with(&all, "prd", "chat")),
            ["prd/sidecar", "stg/chat", "stg/other"]
        );
        assert!(comparing_with(&all, "stg", "chat").is_empty());
    }

    #[test]
    fn mappers_read_a_reflector_store_and_accept_metadata_only_objects() {
        let (store, mut writer) = reflector::store::<ChatService>();
        writer.apply_watcher_event(&watcher::Event::Init);
        for c in fleet() {
            writer.apply_watcher_event(&watcher::Event::InitApply(c.as_ref().clone()));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);

        let meta = |ns: &str, name: &str| ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            ..Default::default()
        };
        let secret = PartialObjectMeta::<Secret> {
            metadata: meta("stg", "llm"),
            ..Default::default()
        };
        assert_eq!(
            names(chatservices_using_secret(&store, &secret)),
            ["stg/chat"]
        );
        let cm = ConfigMap {
            metadata: meta("stg", "chat-config"),
            ..Default::default()
        };
        assert_eq!(
            names(chatservices_using_config_map(&store, &cm)),
            ["stg/other"]
        );
        let baseline = fleet()[0].as_ref().clone();
        assert_eq!(
            names(chatservices_comparing_with(&store, &baseline)),
            ["prd/sidecar", "stg/chat", "stg/other"]
        );
    }
}
