//! Reading the inputs of `validate`: ChatServices (with the fields their types lack
//! and the CRD rules they break), Secrets and ConfigMaps from manifest streams, and
//! Secrets from `--secrets DIR`; and what the operator would read from a cluster,
//! taken from them.

use super::schema::{CrdRules, RuleViolation};
use crate::crd::ChatService;
use crate::dereference::{self, Baseline, Dereferenced, Lookup, SecretKeys};
use crate::manifests::{Document, InputError, documents, parse_error};
use crate::serverless::Target;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

/// Where a manifest came from, for the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Origin {
    pub file: String,
    /// First line of the document.
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// A ChatService read from the inputs, with what the API server would say about it.
#[derive(Debug)]
pub(super) struct ParsedChatService {
    pub(super) resource: ChatService,
    pub(super) origin: Origin,
    /// Manifest fields the ChatService types do not have (the API server drops them).
    pub(super) unknown_fields: Vec<String>,
    /// The CRD's CEL rules the manifest breaks (the API server would refuse it).
    pub(super) rule_violations: Vec<RuleViolation>,
}

/// Everything read from the inputs, by `(namespace, name)`.
#[derive(Debug, Default)]
pub(super) struct Inputs {
    /// Built on the first ChatService: compiling the rules is not free.
    pub(super) rules: Option<CrdRules>,
    pub(super) chat_services: BTreeMap<(String, String), ParsedChatService>,
    pub(super) config_maps: BTreeMap<(String, String), BTreeMap<String, String>>,
    pub(super) secrets: BTreeMap<(String, String), SecretKeys>,
    /// Secrets from `--secrets DIR` sub-directories: they match in every namespace.
    pub(super) secrets_any_namespace: BTreeMap<String, SecretKeys>,
    /// `--target`: every ChatService is checked against it.
    pub(super) target: Option<Target>,
}

impl Inputs {
    /// Reads every document of one manifest stream.
    pub(super) fn read_manifests(
        &mut self,
        file: &str,
        text: &str,
        default_namespace: &str,
    ) -> Result<(), InputError> {
        for doc in documents(text) {
            let value: serde_norway::Value =
                serde_norway::from_str(doc.text).map_err(|e| parse_error(file, &doc, &e))?;
            let origin = Origin {
                file: file.to_string(),
                line: doc.first_line,
            };
            self.read_value(value, Some(&doc), &origin, default_namespace)?;
        }
        Ok(())
    }

    /// One parsed document (or an item of a `kind: List`).
    fn read_value(
        &mut self,
        value: serde_norway::Value,
        doc: Option<&Document<'_>>,
        origin: &Origin,
        default_namespace: &str,
    ) -> Result<(), InputError> {
        let text_of = |v: &serde_norway::Value, k: &str| {
            v.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string()
        };
        let kind = text_of(&value, "kind");
        let api_version = text_of(&value, "apiVersion");
        let namespace = value
            .get("metadata")
            .and_then(|m| m.get("namespace"))
            .and_then(|n| n.as_str())
            .filter(|n| !n.is_empty())
            .unwrap_or(default_namespace)
            .to_string();
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("")
            .to_string();
        let invalid = |message: String| InputError {
            file: origin.file.clone(),
            position: Some((origin.line, 1)),
            message,
        };
        match (kind.as_str(), api_version.as_str()) {
            ("List", _) => {
                if let Some(items) = value.get("items").and_then(|i| i.as_sequence()) {
                    for item in items.clone() {
                        self.read_value(item, None, origin, default_namespace)?;
                    }
                }
            }
            ("ChatService", v) if v.starts_with("chatgate.dev/") => {
                let mut unknown_fields = Vec::new();
                let mut record = |path: serde_ignored::Path<'_>| {
                    let path = path.to_string();
                    if path != "apiVersion" && path != "kind" {
                        unknown_fields.push(path);
                    }
                };
                let mut resource: ChatService = match doc {
                    Some(doc) => serde_ignored::deserialize(
                        serde_norway::Deserializer::from_str(doc.text),
                        &mut record,
                    )
                    .map_err(|e| parse_error(&origin.file, doc, &e))?,
                    None => {
                        serde_ignored::deserialize(value.clone(), &mut record).map_err(|e| {
                            invalid(format!(
                                "ChatService `{name}` does not match the schema: {e}"
                            ))
                        })?
                    }
                };
                if name.is_empty() {
                    return Err(invalid("a ChatService has no metadata.name".into()));
                }
                if self.rules.is_none() {
                    self.rules = CrdRules::new();
                }
                let rule_violations = self
                    .rules
                    .as_ref()
                    .map(|rules| rules.check(&value))
                    .unwrap_or_default();
                resource.metadata.namespace = Some(namespace.clone());
                let key = (namespace, name);
                if let Some(first) = self.chat_services.get(&key) {
                    return Err(invalid(format!(
                        "ChatService {}/{} is defined twice (first at {})",
                        key.0, key.1, first.origin
                    )));
                }
                self.chat_services.insert(
                    key,
                    ParsedChatService {
                        resource,
                        origin: origin.clone(),
                        unknown_fields,
                        rule_violations,
                    },
                );
            }
            ("Secret", "v1") => {
                // Read as the API server would (base64 `data` decoded), so the same
                // code as in the cluster sees key names and URL schemes; a manifest
                // the API would refuse still declares its key names.
                let keys = match serde_norway::from_value::<Secret>(value.clone()) {
                    Ok(secret) => SecretKeys::of_secret(&secret),
                    Err(_) => {
                        let mut keys = SecretKeys::default();
                        for field in ["data", "stringData"] {
                            if let Some(map) = value.get(field).and_then(|d| d.as_mapping()) {
                                for (k, v) in map {
                                    let empty =
                                        v.is_null() || v.as_str().is_some_and(str::is_empty);
                                    if let Some(k) = k.as_str() {
                                        keys.insert(k, empty);
                                    }
                                }
                            }
                        }
                        keys
                    }
                };
                self.secrets.insert((namespace, name), keys);
            }
            ("ConfigMap", "v1") => {
                let mut data = BTreeMap::new();
                if let Some(map) = value.get("data").and_then(|d| d.as_mapping()) {
                    for (k, v) in map {
                        let text = match v {
                            serde_norway::Value::String(s) => s.clone(),
                            serde_norway::Value::Null => String::new(),
                            other => serde_norway::to_string(other)
                                .unwrap_or_default()
                                .trim_end()
                                .to_string(),
                        };
                        if let Some(k) = k.as_str() {
                            data.insert(k.to_string(), text);
                        }
                    }
                }
                self.config_maps.insert((namespace, name), data);
            }
            _ => {}
        }
        Ok(())
    }

    /// Reads the Secrets of a `--secrets DIR`.
    pub(super) fn read_secrets_dir(
        &mut self,
        dir: &Path,
        default_namespace: &str,
    ) -> Result<(), InputError> {
        let shown = dir.display().to_string();
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| InputError::io(&shown, e))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect();
        entries.sort();
        for path in entries {
            let file_name = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            if file_name.starts_with('.') {
                continue; // `..data` links of mounted Secret volumes, editor files
            }
            let shown = path.display().to_string();
            if path.is_dir() {
                let mut keys = SecretKeys::default();
                let mut files: Vec<_> = std::fs::read_dir(&path)
                    .map_err(|e| InputError::io(&shown, e))?
                    .filter_map(Result::ok)
                    .collect();
                files.sort_by_key(|e| e.file_name());
                for entry in files {
                    let key = entry.file_name().to_string_lossy().to_string();
                    if key.starts_with('.') {
                        continue;
                    }
                    // A key file declares the key; its content is never read, so a
                    // pipeline may list key names with empty files (`touch`).
                    let meta = std::fs::metadata(entry.path())
                        .map_err(|e| InputError::io(&entry.path().display().to_string(), e))?;
                    if meta.is_file() {
                        keys.insert(&key, false);
                    }
                }
                self.secrets_any_namespace.insert(file_name, keys);
            } else if ["yaml", "yml", "json"]
                .iter()
                .any(|ext| path.extension().is_some_and(|e| e == *ext))
            {
                let text = std::fs::read_to_string(&path).map_err(|e| InputError::io(&shown, e))?;
                let mut secrets_only = Inputs {
                    rules: self.rules.take(),
                    ..Inputs::default()
                };
                secrets_only.read_manifests(&shown, &text, default_namespace)?;
                self.secrets.extend(secrets_only.secrets);
                self.rules = secrets_only.rules;
            }
        }
        Ok(())
    }

    /// Secret references are checked in a namespace when any of its Secrets is among
    /// the inputs (a pipeline that renders one environment's Secrets says nothing
    /// about another's), or when a `--secrets DIR` holds Secret directories.
    pub(super) fn secrets_checked_in(&self, namespace: &str) -> bool {
        !self.secrets_any_namespace.is_empty() || self.secrets.keys().any(|(ns, _)| ns == namespace)
    }

    /// What the operator would read from the cluster, taken from the inputs.
    pub(super) fn dereference(&self, cs: &ChatService) -> Dereferenced {
        let namespace = cs.namespace().unwrap_or_default();
        let config_map = cs.spec.config_map_ref.as_ref().map(|r| {
            match self.config_maps.get(&(namespace.clone(), r.name.clone())) {
                Some(data) => Lookup::Found(data.clone()),
                None => Lookup::NotFound,
            }
        });
        let secrets = self.secrets_checked_in(&namespace).then(|| {
            dereference::referenced_secrets(&cs.spec)
                .into_iter()
                .map(|name| {
                    let found = self
                        .secrets
                        .get(&(namespace.clone(), name.clone()))
                        .or_else(|| self.secrets_any_namespace.get(&name));
                    let lookup = match found {
                        Some(keys) => Lookup::Found(keys.clone()),
                        None => Lookup::NotFound,
                    };
                    (name, lookup)
                })
                .collect()
        });
        let baseline = dereference::baseline_of(cs).map(|key| match self.chat_services.get(&key) {
            Some(b) => Lookup::Found(Baseline {
                config_map: b.resource.spec.config_map_ref.as_ref().and_then(|r| {
                    self.config_maps
                        .get(&(key.0.clone(), r.name.clone()))
                        .cloned()
                }),
                resource: b.resource.clone(),
            }),
            None => Lookup::NotFound,
        });
        Dereferenced {
            config_map,
            secrets,
            baseline,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parse_error_in_a_later_document_has_its_absolute_line() {
        let text = "kind: ConfigMap\napiVersion: v1\n---\nkind: Secret\n  bad: [\n";
        let mut inputs = Inputs::default();
        let err = inputs
            .read_manifests("m.yaml", text, "default")
            .expect_err("malformed");
        let (line, column) = err.position.expect("position");
        assert_eq!(err.file, "m.yaml");
        assert!((4..=6).contains(&line), "{err}");
        assert!(column >= 1, "{err}");
    }

    const RENDERED: &str = include_str!("../../tests/fixtures/rendered-staging.yaml");
    const PRODUCTION: &str = include_str!("../../tests/fixtures/production.yaml");

    fn read_and_report(text: &str) {
        let mut inputs = Inputs::default();
        if inputs.read_manifests("x.yaml", text, "default").is_ok() {
            let report = inputs.report();
            let _ = report.table();
            let _ = serde_json::to_string(&report);
        }
    }

    proptest::proptest! {
        #[test]
        fn reading_arbitrary_text_never_panics(text in ".{0,300}") {
            read_and_report(&text);
        }

        #[test]
        fn reading_a_damaged_manifest_never_panics(
            at in 0usize..4000,
            junk in proptest::sample::select(vec![
                "", ":", "\n---\n", "  ", "- ", "{", "]", "\"", "&a ", "*a", "!!int ", "~", "\t",
                "\nspec: 3\n", "\nkind: ChatService\n", "\napiVersion: chatgate.dev/v1\n",
            ]),
            cut in 0usize..40,
        ) {
            let text = format!("{PRODUCTION}---\n{RENDERED}");
            let mut at = at.min(text.len());
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            let mut end = (at + cut).min(text.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let damaged = format!("{}{junk}{}", &text[..at], &text[end..]);
            read_and_report(&damaged);
        }
    }
}
