//! What the API server would refuse on `kubectl apply`, checked offline: the CRD's
//! structural schema and CEL rules, and fields the ChatService types do not have
//! (with the schema field nearest to a misspelt one).

use crate::crd::ChatService;
use chatgate_contract::Environment;
use chatgate_contract::config::{self, Problem, ProblemKind};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrArray,
};
use kube::CustomResourceExt;
use std::fmt;

/// One `x-kubernetes-validations` rule of the CRD that a manifest breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RuleViolation {
    /// Field the rule is about, e.g. `spec.replicas`.
    pub(super) field: String,
    pub(super) message: String,
    pub(super) rule: String,
}

/// The CRD's `openAPIV3Schema` as JSON, a CEL validator for its rules, and the
/// same schema compiled as JSON Schema for its structural constraints.
pub(super) struct CrdRules {
    schema: serde_json::Value,
    validator: kube_cel::Validator,
    /// `minimum`/`maximum`, lengths, `enum`, `pattern`, `required`, types.
    structure: jsonschema::Validator,
    /// The schema `structure` was compiled from, to quote a broken constraint.
    structure_schema: serde_json::Value,
}

impl fmt::Debug for CrdRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CrdRules")
    }
}

/// The ChatService's OpenAPI schema, as the generated CRD serves it.
fn chat_service_schema() -> Option<JSONSchemaProps> {
    ChatService::crd()
        .spec
        .versions
        .into_iter()
        .next()?
        .schema?
        .open_api_v3_schema
}

impl CrdRules {
    pub(super) fn new() -> Option<CrdRules> {
        let schema = serde_json::to_value(chat_service_schema()?).ok()?;
        let structure_schema = as_json_schema(schema.clone());
        Some(CrdRules {
            structure: jsonschema::draft4::new(&structure_schema).ok()?,
            structure_schema,
            schema,
            validator: kube_cel::Validator::new(),
        })
    }

    /// Runs every CEL rule of the CRD on a manifest, with the schema's defaults
    /// applied first, as the API server does on create.
    pub(super) fn check(&self, manifest: &serde_norway::Value) -> Vec<RuleViolation> {
        let Ok(object) = serde_json::to_value(manifest) else {
            return Vec::new(); // non-string keys: already refused by deserialization
        };
        let mut violations: Vec<RuleViolation> = self
            .structure
            .iter_errors(&object)
            .map(|e| {
                let keyword = e.kind().keyword().to_string();
                let constraint = self
                    .structure_schema
                    .pointer(e.schema_path().as_str())
                    .map(|v| format!("{keyword}: {v}"))
                    .unwrap_or(keyword);
                RuleViolation {
                    field: dotted(e.instance_path().as_str()),
                    message: e.to_string(),
                    rule: constraint,
                }
            })
            .collect();
        if let Err(errors) = self.validator.validate(&self.schema, &object, None) {
            violations.extend(errors.as_slice().iter().map(|e| RuleViolation {
                field: e.field_path.trim_start_matches('.').to_string(),
                message: e.message.clone(),
                rule: e.rule.clone(),
            }));
        }
        violations
    }
}

/// A Kubernetes structural schema as plain JSON Schema: `nullable: true` becomes a
/// `null` in `type`, as the API server accepts an explicit null for such a field.
fn as_json_schema(mut schema: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match &mut schema {
        Value::Object(node) => {
            if node.get("nullable") == Some(&Value::Bool(true))
                && let Some(Value::String(kind)) = node.get("type")
            {
                let kind = kind.clone();
                node.insert("type".into(), serde_json::json!([kind, "null"]));
            }
            for value in node.values_mut() {
                *value = as_json_schema(value.take());
            }
        }
        Value::Array(items) => {
            for item in items.iter_mut() {
                *item = as_json_schema(item.take());
            }
        }
        _ => {}
    }
    schema
}

/// A JSON pointer (`/spec/replicas`, `/spec/env/0`) as a field path (`spec.replicas`,
/// `spec.env[0]`), the form the rest of the report uses.
fn dotted(pointer: &str) -> String {
    let mut path = String::new();
    for segment in pointer.split('/').skip(1) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if segment.parse::<usize>().is_ok() {
            path.push_str(&format!("[{segment}]"));
        } else {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(&segment);
        }
    }
    path
}

/// A manifest field the ChatService types would drop, as a problem.
pub(super) fn unknown_field_problem(path: &str, env: Environment) -> Problem {
    let hint = suggest_field(path)
        .map(|f| format!("did you mean `{f}`? Otherwise remove it"))
        .unwrap_or_else(|| {
            "remove it; `chatgate-operator crd` prints the fields a ChatService has".into()
        });
    Problem::new(
        path,
        env,
        ProblemKind::Unknown,
        "is not a field of ChatService (chatgate.dev/v1alpha1); the API server would drop it",
        hint,
    )
}

/// The sibling field nearest to a misspelt one, from the CRD's own schema.
fn suggest_field(path: &str) -> Option<String> {
    let schema = &chat_service_schema()?;
    let segments: Vec<&str> = path.split('.').collect();
    let (last, parents) = segments.split_last()?;
    let mut node = schema;
    for segment in parents {
        // serde_ignored writes sequence elements as `name[0]`... or `name.0`.
        let field = segment.split('[').next().unwrap_or(segment);
        if field.parse::<usize>().is_ok() {
            node = node.items.as_ref().and_then(|i| match i {
                JSONSchemaPropsOrArray::Schema(s) => Some(s.as_ref()),
                JSONSchemaPropsOrArray::Schemas(_) => None,
            })?;
            continue;
        }
        node = node.properties.as_ref()?.get(field)?;
    }
    let siblings = node.properties.as_ref()?;
    let nearest = config::closest(last, siblings.keys().map(String::as_str))?;
    let mut suggestion: Vec<&str> = parents.to_vec();
    suggestion.push(nearest);
    Some(suggestion.join("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crd_compiles_both_as_cel_rules_and_as_a_json_schema() {
        assert!(CrdRules::new().is_some());
    }

    #[test]
    fn a_null_is_allowed_where_the_crd_says_nullable() {
        let schema = as_json_schema(serde_json::json!({
            "type": "object",
            "properties": {"resources": {"type": "object", "nullable": true}},
        }));
        let validator = jsonschema::draft4::new(&schema).expect("compiles");
        assert!(validator.is_valid(&serde_json::json!({"resources": null})));
        assert!(!validator.is_valid(&serde_json::json!({"resources": 3})));
    }

    #[test]
    fn json_pointers_read_as_field_paths() {
        assert_eq!(dotted("/spec/replicas"), "spec.replicas");
        assert_eq!(dotted("/spec/env/0/name"), "spec.env[0].name");
        assert_eq!(
            dotted("/metadata/annotations/a~1b"),
            "metadata.annotations.a/b"
        );
        assert_eq!(dotted(""), "");
    }

    #[test]
    fn a_misspelt_field_gets_the_schema_field_as_suggestion() {
        assert_eq!(
            suggest_field("spec.jwt.isuer").as_deref(),
            Some("spec.jwt.issuer")
        );
        assert_eq!(suggest_field("spec.nothingLikeIt"), None);
    }
}
