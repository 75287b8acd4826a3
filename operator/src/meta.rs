//! Names, labels and annotations of the objects the operator owns, in one place so the
//! builder, the watches and the tests agree on them.

use std::collections::BTreeMap;

/// The server-side-apply field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "chatgate-operator";
/// The controller name on Events and in logs.
pub const CONTROLLER_NAME: &str = "chatgate-operator";

/// `app.kubernetes.io/name`: always `chatgate` on the operator's children.
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
/// Value of [`LABEL_NAME`].
pub const APP_NAME: &str = "chatgate";
/// `app.kubernetes.io/instance`: the name of the ChatService a child belongs to.
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
/// `app.kubernetes.io/managed-by`: marks children so the operator watches only its own.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of [`LABEL_MANAGED_BY`].
pub const MANAGED_BY: &str = "chatgate-operator";
/// `app.kubernetes.io/component`: which part of the chat service the object is.
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
/// Value of [`LABEL_COMPONENT`].
pub const COMPONENT: &str = "chat";
/// The environment (`development`, `staging`, `production`) of the ChatService.
pub const LABEL_ENVIRONMENT: &str = "chatgate.dev/environment";

/// On the pod template: hash of the configuration the pods run with, so a change of a
/// ConfigMap value (which does not change the template otherwise) rolls the pods.
pub const ANNOTATION_CONFIG_HASH: &str = "chatgate.dev/config-hash";
/// On every child: hash of the object as the operator last applied it. When the live
/// object carries the desired hash and has not drifted, nothing is written.
pub const ANNOTATION_APPLIED_HASH: &str = "chatgate.dev/applied-hash";

/// On a production ChatService: the namespaces whose ChatServices may use it as their
/// parity baseline (comma-separated, or `*` for every namespace). A baseline in another
/// namespace is read only when it opts in, so a team cannot point at, and read the
/// configuration of, another team's production by naming it. The opt-in is on the
/// object and not on its Namespace: reading Namespaces would need a cluster-wide grant.
pub const ANNOTATION_BASELINE_READABLE_FROM: &str = "chatgate.dev/baseline-readable-from";

/// The label selector of everything the operator manages, for its watches.
pub fn managed_selector() -> String {
    format!("{LABEL_MANAGED_BY}={MANAGED_BY}")
}

/// Labels selecting the pods of ChatService `name` (the Deployment's immutable selector).
pub fn selector_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_owned(), APP_NAME.to_owned()),
        (LABEL_INSTANCE.to_owned(), name.to_owned()),
    ])
}

/// Labels on every child of ChatService `name` and on its pods.
pub fn labels(name: &str, environment: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(name);
    l.insert(LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned());
    l.insert(LABEL_COMPONENT.to_owned(), COMPONENT.to_owned());
    l.insert(LABEL_ENVIRONMENT.to_owned(), environment.to_owned());
    l
}

/// The ChatService a managed object belongs to, from its instance label.
pub fn owner_name(labels: Option<&BTreeMap<String, String>>) -> Option<&str> {
    let labels = labels?;
    if labels.get(LABEL_MANAGED_BY).map(String::as_str) != Some(MANAGED_BY) {
        return None;
    }
    labels.get(LABEL_INSTANCE).map(String::as_str)
}

/// Name of the ConfigMap child holding the non-secret configuration.
pub fn config_map_name(name: &str) -> String {
    format!("{name}-config")
}

/// FNV-1a (64 bit) of `bytes`, hex. Change detection only, not security: a stable
/// hash across processes and versions, with no dependency.
pub fn stable_hash(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_and_sensitive() {
        assert_eq!(stable_hash(b""), "cbf29ce484222325");
        assert_eq!(stable_hash(b"a"), "af63dc4c8601ec8c");
        assert_ne!(stable_hash(b"ab"), stable_hash(b"ba"));
    }

    #[test]
    fn owner_is_read_only_from_managed_objects() {
        let l = labels("chat", "staging");
        assert_eq!(owner_name(Some(&l)), Some("chat"));
        assert_eq!(owner_name(Some(&selector_labels("chat"))), None);
        assert_eq!(owner_name(None), None);
    }
}
