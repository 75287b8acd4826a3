//! `chatgate-operator validate`: the operator's validation, offline, for a pipeline.
//!
//! Reads manifests as `kustomize build` or `helm template` print them (multi-document
//! YAML, `-` for standard input), pairs every non-production ChatService with its
//! production baseline from the same inputs, and runs [`validation::evaluate`] — the
//! very function the operator runs before a rollout — on each. Secrets and
//! ConfigMaps among the inputs (or in `--secrets DIR`) stand in for the cluster's.
//! What the API server would refuse on `kubectl apply` is reported too: fields the
//! ChatService types do not have, and the CRD's CEL rules, run offline.
//!
//! Exit codes: 0 clean (warnings allowed), 1 a problem that would block the rollout,
//! 2 input that cannot be read or parsed (reported with file, line and column).

use crate::crd::{ChatService, ParityMode};
use crate::dereference::{self, Baseline, Dereferenced, Lookup, SecretKeys};
use crate::serverless::{self, Target};
use crate::validation;
use chatgate_contract::Environment;
use chatgate_contract::config::{self, KEYS, Problem, ProblemKind};
use k8s_openapi::api::core::v1::Secret;
use kube::{CustomResourceExt, ResourceExt};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Exit code: nothing blocks a rollout.
pub const EXIT_CLEAN: i32 = 0;
/// Exit code: at least one problem would block the rollout.
pub const EXIT_PROBLEMS: i32 = 1;
/// Exit code: an input could not be read or parsed.
pub const EXIT_UNREADABLE: i32 = 2;

/// Check ChatService manifests offline: configuration, references and parity.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ValidateArgs {
    /// Manifest files (multi-document YAML or JSON, as `kustomize build` or `helm
    /// template` print them); `-` reads standard input. Secrets and ConfigMaps among
    /// them are used to check references (a ConfigMap named by `spec.configMapRef`
    /// must be among them, and so must each non-production resource's baseline);
    /// other kinds are ignored.
    #[arg(value_name = "FILE", required_unless_present = "explain")]
    pub files: Vec<String>,

    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,

    /// Directory of Secrets to check references against: Secret manifests
    /// (`*.yaml`, `*.yml`, `*.json`) and/or one sub-directory per Secret holding one
    /// file per key (the layout `kubectl create secret generic NAME
    /// --from-file=DIR/NAME` reads; such Secrets match in every namespace, and their
    /// key files may be empty: only names are read, never values). May be repeated.
    /// A ChatService's Secret references are checked when its namespace has a Secret
    /// among the inputs or a Secret sub-directory is given.
    #[arg(long, value_name = "DIR")]
    pub secrets: Vec<PathBuf>,

    /// Namespace of manifests that name none (as `kubectl apply -n`).
    #[arg(short = 'n', long, value_name = "NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// Also check every ChatService against what this deploy target can do (Cloud Run's
    /// limits, for one). Without it, a ChatService annotated `chatgate.dev/target:
    /// cloudrun` (or `knative`) is checked against its target.
    #[arg(short = 't', long, value_enum, value_name = "TARGET")]
    pub target: Option<Target>,

    /// Print what a configuration key means (type, default, secret, required, parity
    /// rule) and exit; without KEY, list every key.
    #[arg(long, value_name = "KEY", num_args = 0..=1, default_missing_value = "")]
    pub explain: Option<String>,
}

/// How results are printed.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// A table for people: resource, key, rule, problem and fix.
    #[default]
    Table,
    /// One JSON document for tools.
    Json,
}

/// Runs the command and returns its exit code.
/// Validates the manifests of one YAML stream as `validate -` does, without printing:
/// the report, or why the stream could not be read. The fuzz target `validate` and
/// its corpus replay call this; it must never panic, whatever the text.
pub fn validate_manifests(text: &str) -> Result<Report, String> {
    let mut inputs = Inputs::default();
    inputs
        .read_manifests("<input>", text, "default")
        .map_err(|e| e.to_string())?;
    Ok(inputs.report())
}

/// The fuzz target `validate` and its corpus replay (`operator/tests/fuzz_corpus.rs`):
/// arbitrary bytes as a manifest stream, through validation and both report formats.
pub fn fuzz_validate(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(report) = validate_manifests(text)
    {
        let _ = report.table();
        let _ = serde_json::to_string(&report);
    }
}

pub fn run(args: &ValidateArgs) -> i32 {
    if let Some(key) = &args.explain {
        return explain(key);
    }
    let mut inputs = Inputs::default();
    let mut stdin_read = false;
    let result = (|| -> Result<(), InputError> {
        for file in &args.files {
            let (name, text) = if file == "-" {
                let mut text = String::new();
                if !stdin_read {
                    std::io::stdin()
                        .read_to_string(&mut text)
                        .map_err(|e| InputError::io("<stdin>", e))?;
                    stdin_read = true;
                }
                ("<stdin>".to_string(), text)
            } else {
                let text = std::fs::read_to_string(file).map_err(|e| InputError::io(file, e))?;
                (file.clone(), text)
            };
            inputs.read_manifests(&name, &text, &args.namespace)?;
        }
        for dir in &args.secrets {
            inputs.read_secrets_dir(dir, &args.namespace)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        say_err(&format!("error: {e}"));
        return EXIT_UNREADABLE;
    }
    if inputs.chat_services.is_empty() {
        say_err(
            "error: no ChatService (apiVersion chatgate.dev/v1alpha1) among the inputs; pass the manifests `kustomize build` or `helm template` print",
        );
        return EXIT_UNREADABLE;
    }
    inputs.target = args.target;
    let report = inputs.report();
    match args.output {
        OutputFormat::Table => say(&report.table()),
        OutputFormat::Json => match serde_json::to_string_pretty(&report) {
            Ok(json) => say(&format!("{json}\n")),
            Err(e) => {
                say_err(&format!("error: cannot print JSON: {e}"));
                return EXIT_UNREADABLE;
            }
        },
    }
    for note in &report.notes {
        say_err(&format!("note: {note}"));
    }
    if report
        .problems
        .iter()
        .any(|p| p.severity == Severity::Error)
    {
        EXIT_PROBLEMS
    } else {
        EXIT_CLEAN
    }
}

/// Prints to standard output. A closed pipe (`validate ... | head`) is not an error
/// worth a panic: the reader has what it wanted, and the exit code still tells.
fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// Prints one line to standard error, never panicking.
fn say_err(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn explain(key: &str) -> i32 {
    if key.is_empty() {
        let width = KEYS.iter().map(|k| k.key.len()).max().unwrap_or(0);
        for k in KEYS {
            say(&format!(
                "{:width$}  {:7}  {}\n",
                k.key,
                k.parity.as_str(),
                k.description
            ));
        }
        return EXIT_CLEAN;
    }
    match config::explain(key) {
        Some(text) => {
            say(&format!("{text}\n"));
            EXIT_CLEAN
        }
        None => {
            let hint = config::closest(key, KEYS.iter().map(|k| k.key))
                .map(|k| format!("did you mean {k}?"))
                .unwrap_or_else(|| "run `--explain` without a key to list them".into());
            say_err(&format!(
                "error: `{key}` is not a chatgate configuration key; {hint}"
            ));
            EXIT_UNREADABLE
        }
    }
}

/// An input that could not be read or parsed, with its position when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputError {
    pub file: String,
    /// 1-based line and column, when the parser knows them.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

impl InputError {
    fn io(file: &str, e: std::io::Error) -> Self {
        InputError {
            file: file.to_string(),
            position: None,
            message: format!("cannot read: {e}"),
        }
    }
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, column)) => write!(f, "{}:{line}:{column}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

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

#[derive(Debug)]
struct ParsedChatService {
    resource: ChatService,
    origin: Origin,
    /// Manifest fields the ChatService types do not have (the API server drops them).
    unknown_fields: Vec<String>,
    /// The CRD's CEL rules the manifest breaks (the API server would refuse it).
    rule_violations: Vec<RuleViolation>,
}

/// One `x-kubernetes-validations` rule of the CRD that a manifest breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RuleViolation {
    /// Field the rule is about, e.g. `spec.replicas`.
    field: String,
    message: String,
    rule: String,
}

/// The CRD's `openAPIV3Schema` as JSON, a CEL validator for its rules, and the
/// same schema compiled as JSON Schema for its structural constraints.
struct CrdRules {
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

impl CrdRules {
    fn new() -> Option<CrdRules> {
        let crd = ChatService::crd();
        let schema = crd
            .spec
            .versions
            .first()?
            .schema
            .as_ref()?
            .open_api_v3_schema
            .as_ref()?;
        let schema = serde_json::to_value(schema).ok()?;
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
    fn check(&self, manifest: &serde_norway::Value) -> Vec<RuleViolation> {
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

/// Everything read from the inputs, by `(namespace, name)`.
#[derive(Debug, Default)]
struct Inputs {
    /// Built on the first ChatService: compiling the rules is not free.
    rules: Option<CrdRules>,
    chat_services: BTreeMap<(String, String), ParsedChatService>,
    config_maps: BTreeMap<(String, String), BTreeMap<String, String>>,
    secrets: BTreeMap<(String, String), SecretKeys>,
    /// Secrets from `--secrets DIR` sub-directories: they match in every namespace.
    secrets_any_namespace: BTreeMap<String, SecretKeys>,
    /// `--target`: every ChatService is checked against it.
    target: Option<Target>,
}

/// One YAML document of a stream, with the line it starts on.
#[derive(Debug, PartialEq, Eq)]
struct Document<'a> {
    first_line: usize,
    text: &'a str,
}

/// Splits a YAML stream at its `---` markers and after its `...` markers (which YAML
/// only allows at column 0 and never inside a document's content), remembering where
/// each document starts so a parser's position can be made absolute. `%YAML`/`%TAG`
/// directives stay with the document whose `---` follows them.
fn documents(text: &str) -> Vec<Document<'_>> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut start_line = 1;
    let mut offset = 0;
    // What the current chunk holds so far, besides blank lines and comments.
    let (mut has_directive, mut has_content) = (false, false);
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let is_marker = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if is_marker && offset > start && (!has_directive || has_content) {
            docs.push(Document {
                first_line: start_line,
                text: &text[start..offset],
            });
            start = offset;
            start_line = index + 1;
            (has_directive, has_content) = (false, false);
        }
        if bare.starts_with('%') && !has_content {
            has_directive = true;
        } else if !(bare.trim().is_empty() || bare.starts_with('#')) {
            has_content = true;
        }
        offset += line.len();
        if bare == "..." {
            docs.push(Document {
                first_line: start_line,
                text: &text[start..offset],
            });
            start = offset;
            start_line = index + 2;
            (has_directive, has_content) = (false, false);
        }
    }
    if start < text.len() {
        docs.push(Document {
            first_line: start_line,
            text: &text[start..],
        });
    }
    docs
}

fn parse_error(file: &str, doc: &Document<'_>, e: &serde_norway::Error) -> InputError {
    // serde_norway appends " at line L column C" to its message; the position is
    // given separately here, relative to the whole file.
    let mut message = e.to_string();
    if let Some(at) = message.rfind(" at line ") {
        message.truncate(at);
    }
    InputError {
        file: file.to_string(),
        position: e
            .location()
            .map(|l| (doc.first_line + l.line() - 1, l.column())),
        message,
    }
}

impl Inputs {
    fn read_manifests(
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

    fn read_secrets_dir(&mut self, dir: &Path, default_namespace: &str) -> Result<(), InputError> {
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
    fn secrets_checked_in(&self, namespace: &str) -> bool {
        !self.secrets_any_namespace.is_empty() || self.secrets.keys().any(|(ns, _)| ns == namespace)
    }

    /// What the operator would read from the cluster, taken from the inputs.
    fn dereference(&self, cs: &ChatService) -> Dereferenced {
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

    fn report(&self) -> Report {
        let mut report = Report::default();
        for ((namespace, name), parsed) in &self.chat_services {
            let cs = &parsed.resource;
            let resource = format!("{namespace}/{name}");
            let validation = validation::evaluate(cs, &self.dereference(cs));
            let env = cs.spec.environment;
            let mut rows: Vec<(Problem, Severity)> = parsed
                .unknown_fields
                .iter()
                .map(|path| (unknown_field_problem(path, env), Severity::Error))
                .collect();
            rows.extend(parsed.rule_violations.iter().map(|v| {
                let problem = Problem::new(
                    &v.field,
                    env,
                    ProblemKind::Invalid,
                    format!("{} (the API server refuses this manifest)", v.message),
                    format!(
                        "change the manifest so that the CRD rule `{}` holds",
                        v.rule
                    ),
                );
                (problem, Severity::Error)
            }));
            // A field the API server refuses is reported once, with the CRD's own message.
            let refused = |key: &str| parsed.rule_violations.iter().any(|v| v.field == key);
            rows.extend(
                validation
                    .config_problems
                    .iter()
                    .filter(|p| !refused(&p.key))
                    .map(|p| (p.clone(), Severity::Error)),
            );
            let target = self.target.or_else(|| Target::annotated(cs));
            let mut refused = 0;
            if let Some(target) = target {
                // Checked whether or not a problem blocks the rollout: every
                // reason not to deploy is reported at once.
                for r in serverless::refusals(cs, validation.spec().config(), target) {
                    refused += 1;
                    rows.push((
                        Problem::new(
                            &r.field,
                            env,
                            ProblemKind::Platform,
                            format!("{} (target {})", r.message, target.as_str()),
                            r.fix,
                        ),
                        Severity::Error,
                    ));
                }
            }
            if let Some(parity) = &validation.parity {
                let severity = match parity.mode {
                    ParityMode::Enforce => Severity::Error,
                    ParityMode::Warn => Severity::Warning,
                };
                rows.extend(parity.problems.iter().map(|p| (p.clone(), severity)));
            }
            report.resources.push(ResourceSummary {
                resource: resource.clone(),
                origin: parsed.origin.clone(),
                environment: env,
                baseline: validation.parity.as_ref().map(|p| p.baseline.clone()),
                blocks_rollout: validation.blocks_rollout()
                    || refused > 0
                    || !parsed.unknown_fields.is_empty()
                    || !parsed.rule_violations.is_empty(),
                problems: rows.len(),
            });
            report
                .problems
                .extend(rows.into_iter().map(|(p, severity)| ProblemRow {
                    resource: resource.clone(),
                    file: parsed.origin.file.clone(),
                    line: parsed.origin.line,
                    key: p.key,
                    environment: p.environment,
                    rule: p.kind.rule().to_string(),
                    kind: p.kind,
                    severity,
                    message: p.message,
                    fix: p.fix,
                }));
        }
        for ((namespace, name), parsed) in &self.chat_services {
            if !self.secrets_checked_in(namespace)
                && !dereference::referenced_secrets(&parsed.resource.spec).is_empty()
            {
                report.notes.push(format!(
                    "Secret references of {namespace}/{name} were not checked: no Secret of namespace `{namespace}` among the inputs (add its Secret manifests or --secrets DIR)"
                ));
            }
        }
        report
    }
}

/// A manifest field the ChatService types would drop, as a problem.
fn unknown_field_problem(path: &str, env: Environment) -> Problem {
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
    let crd = ChatService::crd();
    let schema = crd
        .spec
        .versions
        .first()?
        .schema
        .as_ref()?
        .open_api_v3_schema
        .as_ref()?;
    let segments: Vec<&str> = path.split('.').collect();
    let (last, parents) = segments.split_last()?;
    let mut node = schema;
    for segment in parents {
        // serde_ignored writes sequence elements as `name[0]`... or `name.0`.
        let field = segment.split('[').next().unwrap_or(segment);
        if field.parse::<usize>().is_ok() {
            node = node.items.as_ref().and_then(|i| match i {
                k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(s) => Some(s.as_ref()),
                k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schemas(_) => None,
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

/// Whether a problem fails the pipeline step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Blocks the rollout (exit 1).
    Error,
    /// A parity difference under `mode: Warn`: reported, rolled out anyway.
    Warning,
}

/// The result of a run, as printed with `-o json`.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub resources: Vec<ResourceSummary>,
    pub problems: Vec<ProblemRow>,
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceSummary {
    /// `namespace/name`.
    pub resource: String,
    #[serde(flatten)]
    pub origin: Origin,
    pub environment: Environment,
    /// `namespace/name` of the production baseline, when parity is checked.
    pub baseline: Option<String>,
    pub blocks_rollout: bool,
    pub problems: usize,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProblemRow {
    pub resource: String,
    pub file: String,
    pub line: usize,
    pub key: String,
    pub environment: Environment,
    pub rule: String,
    pub kind: ProblemKind,
    pub severity: Severity,
    pub message: String,
    pub fix: String,
}

impl Report {
    /// The table people read: one row per problem, then a line per resource.
    pub fn table(&self) -> String {
        let mut out = String::new();
        if !self.problems.is_empty() {
            let header = ["RESOURCE", "KEY", "ENV", "RULE", "PROBLEM"];
            let rows: Vec<[String; 5]> = self
                .problems
                .iter()
                .map(|p| {
                    let rule = match p.severity {
                        Severity::Error => p.rule.clone(),
                        Severity::Warning => format!("{} (warn)", p.rule),
                    };
                    [
                        p.resource.clone(),
                        p.key.clone(),
                        p.environment.to_string(),
                        rule,
                        format!("{}; {}", p.message, p.fix),
                    ]
                })
                .collect();
            let width = |i: usize| {
                rows.iter()
                    .map(|r| r[i].chars().count())
                    .chain([header[i].len()])
                    .max()
                    .unwrap_or(0)
            };
            let widths = [width(0), width(1), width(2), width(3)];
            let mut line = |cells: [&str; 5]| {
                for (cell, w) in cells.iter().zip(widths) {
                    out.push_str(&format!("{cell:w$}  "));
                }
                out.push_str(cells[4]);
                out.push('\n');
            };
            line(header);
            for r in &rows {
                line([&r[0], &r[1], &r[2], &r[3], &r[4]]);
            }
            out.push('\n');
        }
        for r in &self.resources {
            let verdict = if r.blocks_rollout {
                "would not be rolled out"
            } else if r.problems > 0 {
                "ok with warnings"
            } else {
                "ok"
            };
            let baseline = r
                .baseline
                .as_ref()
                .map(|b| format!(", baseline {b}"))
                .unwrap_or_default();
            out.push_str(&format!(
                "{} ({}, {}{}): {}, {} problem{}\n",
                r.resource,
                r.origin,
                r.environment,
                baseline,
                verdict,
                r.problems,
                if r.problems == 1 { "" } else { "s" }
            ));
        }
        out
    }
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
    fn documents_are_split_at_markers_with_their_first_line() {
        let text = "a: 1\n---\nb: 2\n--- # c\nc: 3\n";
        let docs = documents(text);
        assert_eq!(
            docs,
            vec![
                Document {
                    first_line: 1,
                    text: "a: 1\n"
                },
                Document {
                    first_line: 2,
                    text: "---\nb: 2\n"
                },
                Document {
                    first_line: 4,
                    text: "--- # c\nc: 3\n"
                },
            ]
        );
        assert_eq!(documents("---\na: 1\n").len(), 1);
        assert_eq!(
            documents("%YAML 1.2\n---\na: 1\n...\n%YAML 1.2\n---\nb: 2\n"),
            vec![
                Document {
                    first_line: 1,
                    text: "%YAML 1.2\n---\na: 1\n...\n"
                },
                Document {
                    first_line: 5,
                    text: "%YAML 1.2\n---\nb: 2\n"
                },
            ]
        );
        for doc in documents("%YAML 1.2\n---\na: 1\n...\n%YAML 1.2\n---\nb: 2\n") {
            serde_norway::from_str::<serde_norway::Value>(doc.text).expect("one document each");
        }
        assert!(documents("").is_empty());
    }

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

    const RENDERED: &str = include_str!("../tests/fixtures/rendered-staging.yaml");
    const PRODUCTION: &str = include_str!("../tests/fixtures/production.yaml");

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

    #[test]
    fn a_misspelt_field_gets_the_schema_field_as_suggestion() {
        assert_eq!(
            suggest_field("spec.jwt.isuer").as_deref(),
            Some("spec.jwt.issuer")
        );
        assert_eq!(suggest_field("spec.nothingLikeIt"), None);
    }
}

#[cfg(test)]
mod target_tests {
    use super::*;

    const CLOUD_RUN: &str = "apiVersion: chatgate.dev/v1alpha1\nkind: ChatService\nmetadata:\n  name: chat\n  annotations: {chatgate.dev/target: cloudrun}\nspec: {image: x, environment: development, rollout: {drainSeconds: 30}}\n";

    fn report(text: &str, target: Option<Target>) -> Report {
        let mut inputs = Inputs::default();
        inputs.read_manifests("x.yaml", text, "default").unwrap();
        inputs.target = target;
        inputs.report()
    }

    #[test]
    fn a_chat_service_annotated_for_cloud_run_is_checked_against_cloud_run() {
        let r = report(CLOUD_RUN, None);
        assert_eq!(r.problems.len(), 1, "{}", r.table());
        let p = &r.problems[0];
        assert_eq!(
            (p.key.as_str(), p.rule.as_str(), p.severity),
            ("spec.rollout.drainSeconds", "platform", Severity::Error)
        );
        assert!(p.message.contains("10 s after SIGTERM"), "{}", p.message);
        assert!(r.resources[0].blocks_rollout);
    }

    #[test]
    fn without_the_annotation_the_target_flag_decides() {
        let plain = CLOUD_RUN.replace("  annotations: {chatgate.dev/target: cloudrun}\n", "");
        assert!(report(&plain, None).problems.is_empty());
        assert_eq!(report(&plain, Some(Target::Cloudrun)).problems.len(), 1);
        assert!(report(&plain, Some(Target::Knative)).problems.is_empty());
    }
}
