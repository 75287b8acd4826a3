//! `chatgate-operator validate` as a pipeline runs it: the real binary on manifest
//! files, judged by its exit code and what it prints.
//!
//! The last test proves the three places that validate configuration — the service at
//! startup, the operator before a rollout and this command — report the same keys.

use chatgate_contract::config::{ConfigSet, ConfigValue, Origin};
use chatgate_operator::configuration::declared_config;
use chatgate_operator::crd::ChatService;
use chatgate_operator::dereference::{Dereferenced, Lookup, SecretKeys, referenced_secrets};
use chatgate_operator::validation;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Runs `chatgate-operator validate ARGS...` in the fixtures directory.
fn validate(args: &[&str]) -> Output {
    validate_with_stdin(args, None)
}

fn validate_with_stdin(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatgate-operator"))
        .arg("validate")
        .args(args)
        .current_dir(fixtures())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the operator binary starts");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(text.as_bytes())
            .expect("stdin is written");
    }
    child.wait_with_output().expect("the operator binary ends")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("-o json prints JSON ({e}): {}", stdout(o)))
}

/// `(resource, key, rule)` of every problem in a JSON report.
fn problems(report: &serde_json::Value) -> Vec<(String, String, String)> {
    report["problems"]
        .as_array()
        .expect("problems is a list")
        .iter()
        .map(|p| {
            (
                p["resource"].as_str().unwrap_or_default().to_string(),
                p["key"].as_str().unwrap_or_default().to_string(),
                p["rule"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn triple(resource: &str, key: &str, rule: &str) -> (String, String, String) {
    (resource.into(), key.into(), rule.into())
}

const STAGING: &str = "chat-staging/chat";

#[test]
fn staging_equal_to_production_passes() {
    let out = validate(&["production.yaml", "staging.yaml"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains(
        "chat-staging/chat (staging.yaml:1, staging, baseline chat-production/chat): ok"
    ));
}

#[test]
fn seed_scenario_staging_without_the_llm_key_fails_naming_the_key() {
    let out = validate(&["production.yaml", "staging-missing-llm-key.yaml"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let table = stdout(&out);
    assert!(table.contains("RESOURCE"), "{table}");
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.contains("CHATGATE_LLM_API_KEY"))
        .collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(
        rows.iter()
            .any(|r| r.contains("required") && r.contains("staging"))
    );
    assert!(rows.iter().any(|r| r.contains("parity:present")
        && r.contains("is set in production but missing in staging")));
    assert!(table.contains("would not be rolled out"), "{table}");
}

#[test]
fn a_drifting_match_key_is_reported_and_an_allowed_difference_is_not() {
    let out = validate(&["production.yaml", "staging-jwt-drift.yaml", "-o", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        problems(&json(&out)).contains(&triple(STAGING, "CHATGATE_JWT_ALGORITHM", "parity:match")),
        "{}",
        stdout(&out)
    );

    let out = validate(&[
        "production.yaml",
        "staging-jwt-drift-allowed.yaml",
        "-o",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert_eq!(problems(&json(&out)), vec![]);
}

#[test]
fn a_baseline_that_does_not_exist_is_reported_as_such() {
    let out = validate(&[
        "production.yaml",
        "staging-missing-baseline.yaml",
        "-o",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let report = json(&out);
    assert_eq!(
        problems(&report),
        [triple(STAGING, "spec.parity.baseline", "baseline")]
    );
    let message = report["problems"][0]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.contains("chat-production/chat-prod` does not exist"),
        "{message}"
    );
}

#[test]
fn a_baseline_not_among_the_inputs_is_missing() {
    let out = validate(&["staging.yaml", "-o", "json"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        problems(&json(&out)),
        [triple(STAGING, "spec.parity.baseline", "baseline")]
    );
}

#[test]
fn malformed_yaml_exits_2_with_file_line_and_column() {
    let out = validate(&["production.yaml", "malformed.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    // `replicas` is indented one column too far on line 15 of the second document.
    let err = stderr(&out);
    assert!(err.starts_with("error: malformed.yaml:15:"), "{err}");
    let column: String = err["error: malformed.yaml:15:".len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    assert!(!column.is_empty(), "{err}");
}

#[test]
fn an_unreadable_file_exits_2_naming_it() {
    let out = validate(&["no-such-file.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no-such-file.yaml: cannot read"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_value_of_the_wrong_type_exits_2_with_its_position() {
    let text = "apiVersion: chatgate.dev/v1alpha1\nkind: ChatService\nmetadata: {name: chat}\nspec:\n  image: x\n  environment: stagin\n";
    let out = validate_with_stdin(&["-"], Some(text));
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.starts_with("error: <stdin>:6:"), "{err}");
    assert!(err.contains("stagin"), "{err}");
}

#[test]
fn unknown_spec_fields_and_configuration_keys_are_reported() {
    let out = validate(&["staging-unknown-keys.yaml", "-o", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let report = json(&out);
    let found = problems(&report);
    assert!(
        found.contains(&triple(STAGING, "spec.jwt.isuer", "unknown-key")),
        "{found:?}"
    );
    assert!(
        found.contains(&triple(STAGING, "CHATGATE_MAX_CONECTIONS", "unknown-key")),
        "{found:?}"
    );
    let fixes: Vec<&str> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["fix"].as_str())
        .collect();
    assert!(
        fixes
            .iter()
            .any(|f| f.contains("did you mean `spec.jwt.issuer`")),
        "{fixes:?}"
    );
    assert!(
        fixes.iter().any(|f| f.contains("CHATGATE_MAX_CONNECTIONS")),
        "{fixes:?}"
    );
}

#[test]
fn a_manifest_still_setting_the_removed_critical_services_field_is_told_to_drop_it() {
    // `spec.criticalServices` existed in earlier v1alpha1 manifests; `/ws` needs every
    // critical service, so the field was removed. The API server would prune it
    // without a word; validate names it.
    let manifest = "apiVersion: chatgate.dev/v1alpha1
kind: ChatService
metadata:
  name: chat
  namespace: dev
spec:
  image: ghcr.io/chatgate/chatgate-service:1.0.0
  environment: development
  criticalServices: [store, llm]
";
    let out = validate_with_stdin(&["-", "-o", "json"], Some(manifest));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let report = json(&out);
    assert_eq!(
        problems(&report),
        [triple("dev/chat", "spec.criticalServices", "unknown-key")]
    );
    let message = report["problems"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("the API server would drop it"),
        "{message}"
    );
    assert_eq!(report["resources"][0]["blocksRollout"], true);
}

#[test]
fn json_output_describes_every_resource_and_problem() {
    let out = validate(&[
        "production.yaml",
        "staging-missing-llm-key.yaml",
        "-o",
        "json",
    ]);
    let report = json(&out);
    let resources = report["resources"].as_array().expect("resources");
    assert_eq!(resources.len(), 2);
    let staging = resources
        .iter()
        .find(|r| r["resource"] == STAGING)
        .expect("staging is listed");
    assert_eq!(staging["file"], "staging-missing-llm-key.yaml");
    assert_eq!(staging["line"], 1);
    assert_eq!(staging["environment"], "staging");
    assert_eq!(staging["baseline"], "chat-production/chat");
    assert_eq!(staging["blocksRollout"], true);
    for p in report["problems"].as_array().unwrap() {
        for field in [
            "resource",
            "key",
            "environment",
            "rule",
            "message",
            "fix",
            "severity",
        ] {
            assert!(p[field].is_string(), "{field} missing in {p}");
        }
    }
}

#[test]
fn stdin_is_read_for_dash() {
    let production = std::fs::read_to_string(fixtures().join("production.yaml")).unwrap();
    let staging = std::fs::read_to_string(fixtures().join("staging-missing-llm-key.yaml")).unwrap();
    let stream = format!("{production}---\n{staging}");
    let out = validate_with_stdin(&["-", "-o", "json"], Some(&stream));
    assert_eq!(out.status.code(), Some(1));
    let report = json(&out);
    assert!(problems(&report).contains(&triple(STAGING, "CHATGATE_LLM_API_KEY", "required")));
    let staging = report["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resource"] == STAGING)
        .unwrap();
    assert_eq!(staging["file"], "<stdin>");
    assert_eq!(
        staging["line"], 24,
        "the second document starts at its `---`"
    );
}

#[test]
fn a_rendered_stream_with_other_kinds_supplies_secrets_and_config_maps() {
    let out = validate(&["production.yaml", "rendered-staging.yaml", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let report = json(&out);
    assert_eq!(report["resources"].as_array().unwrap().len(), 2);
    // production's Secrets are not among the inputs: said, not reported as missing.
    assert!(
        report["notes"][0]
            .as_str()
            .unwrap_or_default()
            .contains("chat-production/chat were not checked"),
        "{report}"
    );
}

#[test]
fn a_key_missing_from_a_rendered_config_map_or_secret_is_reported() {
    let rendered = std::fs::read_to_string(fixtures().join("rendered-staging.yaml")).unwrap();
    let broken = rendered
        .replace(
            "  api-key: c2stcGxhY2Vob2xkZXI=",
            "  apikey: c2stcGxhY2Vob2xkZXI=",
        )
        .replace("CHATGATE_LOG_FORMAT: json", "CHATGATE_LOG_FORMAT: yaml");
    let out = validate_with_stdin(&["production.yaml", "-", "-o", "json"], Some(&broken));
    assert_eq!(out.status.code(), Some(1));
    let found = problems(&json(&out));
    assert!(
        found.contains(&triple(STAGING, "CHATGATE_LLM_API_KEY", "reference")),
        "{found:?}"
    );
    assert!(
        found.contains(&triple(STAGING, "CHATGATE_LOG_FORMAT", "type")),
        "{found:?}"
    );
}

#[test]
fn a_secrets_directory_checks_references_offline() {
    let out = validate(&[
        "production.yaml",
        "staging.yaml",
        "--secrets",
        "secrets",
        "-o",
        "json",
    ]);
    let report = json(&out);
    // Directory Secrets match every namespace, so production is checked too: its
    // chat-jwt and chat-db are not in the directory's manifests' namespace.
    let found = problems(&report);
    assert!(
        !found.iter().any(|(r, _, _)| r == STAGING),
        "staging's Secrets are all in the directory: {found:?}"
    );

    let out = validate(&[
        "production.yaml",
        "staging-missing-llm-key.yaml",
        "--secrets",
        "secrets",
        "-o",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn warn_mode_reports_without_failing() {
    let staging = std::fs::read_to_string(fixtures().join("staging-jwt-drift.yaml"))
        .unwrap()
        .replace(
            "    baseline: {name: chat, namespace: chat-production}",
            "    baseline: {name: chat, namespace: chat-production}\n    mode: Warn",
        );
    let out = validate_with_stdin(&["production.yaml", "-", "-o", "json"], Some(&staging));
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let report = json(&out);
    assert_eq!(report["problems"][0]["severity"], "warning");
    assert_eq!(report["problems"][0]["key"], "CHATGATE_JWT_ALGORITHM");
}

#[test]
fn explain_prints_a_keys_description() {
    let out = validate(&["--explain", "CHATGATE_LLM_API_KEY"]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert!(text.contains("parity:   present"), "{text}");
    assert!(text.contains("secret:   yes"), "{text}");

    let out = validate(&["--explain", "CHATGATE_LLM_APIKEY"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("did you mean CHATGATE_LLM_API_KEY"));

    let out = validate(&["--explain"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("CHATGATE_JWT_ALGORITHM"));
}

/// Staging ChatServices that differ in one way each; each is run through the three.
const CASES: &[(&str, &str)] = &[
    ("clean", ""),
    ("seed scenario", "  llm: {provider: openai}\n"),
    (
        "unknown key",
        "  config: {CHATGATE_MAX_CONECTIONS: \"10\"}\n",
    ),
    (
        "invalid value",
        "  config: {CHATGATE_MAX_CONNECTIONS: \"0\", CHATGATE_LOG_FORMAT: xml}\n",
    ),
    (
        "missing claims",
        "  jwt: {secretRef: {name: chat-jwt, key: secret}}\n",
    ),
    ("config map", "  configMapRef: {name: chat-config}\n"),
];

const CASE_BASE: &str = "apiVersion: chatgate.dev/v1alpha1\nkind: ChatService\nmetadata: {name: chat, namespace: chat-staging}\nspec:\n  image: x\n  environment: staging\n  database: {urlSecretRef: {name: chat-db, key: url}}\n";
const CASE_JWT: &str = "  jwt: {issuer: https://auth.example.com/, audience: chat, secretRef: {name: chat-jwt, key: secret}}\n";
const CASE_SECRETS: &[(&str, &str, &str)] = &[
    (
        "chat-jwt",
        "secret",
        "0123456789abcdef0123456789abcdef-staging",
    ),
    ("chat-db", "url", "postgres://chat:placeholder@db/chat"),
];
const CASE_CONFIG_MAP: &[(&str, &str)] = &[
    ("CHATGATE_SEND_QUEUE", "none"),
    ("CHATGATE_IDLE_TIMEOUT", "60"),
];

fn case_manifest(extra: &str) -> String {
    let jwt = if extra.contains("jwt:") { "" } else { CASE_JWT };
    format!("{CASE_BASE}{jwt}{extra}")
}

fn secrets_and_config_map_manifests() -> String {
    let mut out = String::new();
    for (name, key, value) in CASE_SECRETS {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: chat-staging}}\nstringData: {{{key}: \"{value}\"}}\n"
        ));
    }
    out.push_str("---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: chat-config, namespace: chat-staging}\ndata:\n");
    for (k, v) in CASE_CONFIG_MAP {
        out.push_str(&format!("  {k}: \"{v}\"\n"));
    }
    out
}

/// (a) The service: the environment a pod of this spec gets (Secret values resolved by
/// the kubelet, the ConfigMap's keys loaded), validated at startup.
fn service_keys(cs: &ChatService) -> BTreeSet<String> {
    let config_map: BTreeMap<String, String> = CASE_CONFIG_MAP
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let (declared, _) = declared_config(
        &cs.spec,
        cs.spec.config_map_ref.as_ref().map(|_| &config_map),
    );
    let env: Vec<(String, String)> = declared
        .values
        .iter()
        .map(|(k, v)| {
            let value = match v {
                ConfigValue::Literal(v) => v.clone(),
                ConfigValue::SecretRef { secret, key } => CASE_SECRETS
                    .iter()
                    .find(|(s, k, _)| s == secret && k == key)
                    .map(|(_, _, v)| v.to_string())
                    .expect("the case's Secrets hold every referenced key"),
            };
            (k.clone(), value)
        })
        .collect();
    ConfigSet::from_env_vars(env)
        .validate(Origin::Process)
        .into_iter()
        .map(|p| p.key)
        .collect()
}

/// (b) The operator: `validation::evaluate` with the same Secrets and ConfigMap read.
fn operator_keys(cs: &ChatService) -> BTreeSet<String> {
    let secrets = referenced_secrets(&cs.spec)
        .into_iter()
        .map(|name| {
            let mut keys = SecretKeys::default();
            for (_, key, _) in CASE_SECRETS.iter().filter(|(s, _, _)| *s == name) {
                keys.insert(key, false);
            }
            (name, Lookup::Found(keys))
        })
        .collect();
    let read = Dereferenced {
        config_map: cs.spec.config_map_ref.as_ref().map(|_| {
            Lookup::Found(
                CASE_CONFIG_MAP
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        }),
        secrets: Some(secrets),
        baseline: None,
    };
    validation::evaluate(cs, &read)
        .config_problems
        .into_iter()
        .map(|p| p.key)
        .collect()
}

/// (c) The pipeline: the `validate` binary on the manifests.
fn cli_keys(manifest: &str) -> BTreeSet<String> {
    let stream = format!("{manifest}{}", secrets_and_config_map_manifests());
    let out = validate_with_stdin(&["-", "-o", "json"], Some(&stream));
    assert_ne!(out.status.code(), Some(2), "{}", stderr(&out));
    json(&out)["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["key"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn the_service_the_operator_and_validate_report_the_same_keys() {
    for (name, extra) in CASES {
        let manifest = case_manifest(extra);
        let cs: ChatService = serde_norway::from_str(&manifest).expect("case parses");
        let service = service_keys(&cs);
        let operator = operator_keys(&cs);
        let cli = cli_keys(&manifest);
        assert_eq!(service, operator, "{name}: service vs operator");
        assert_eq!(operator, cli, "{name}: operator vs validate");
        assert_eq!(service.is_empty(), *name == "clean", "{name}: {service:?}");
    }
}

/// The production fixture changed by `edit`, validated: it must exit 1; its JSON report.
fn production_failing_with(edit: impl Fn(String) -> String) -> serde_json::Value {
    let production = edit(std::fs::read_to_string(fixtures().join("production.yaml")).unwrap());
    let out = validate_with_stdin(&["-", "-o", "json"], Some(&production));
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    json(&out)
}

#[test]
fn a_manifest_the_api_server_would_refuse_is_reported_with_the_crd_rule() {
    let report = production_failing_with(|p| p.replace("replicas: 3", "replicas: 1"));
    let found = problems(&report);
    assert_eq!(
        found,
        [triple("chat-production/chat", "spec.replicas", "type")],
        "{report}"
    );
    let message = report["problems"][0]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("at least 2 replicas"), "{message}");
}

#[test]
fn values_outside_the_crds_openapi_constraints_are_reported() {
    let report = production_failing_with(|p| {
        p.replace("replicas: 3", "replicas: 5000").replace(
            "image: ghcr.io/chatgate/chatgate-service:1.4.2",
            "image: \"\"",
        )
    });
    let found = problems(&report);
    assert_eq!(
        found,
        [
            triple("chat-production/chat", "spec.image", "type"),
            triple("chat-production/chat", "spec.replicas", "type"),
        ],
        "{report}"
    );
    let text = report.to_string();
    assert!(text.contains("greater than the maximum of 1000"), "{text}");
    assert!(text.contains("`maximum: 1000"), "{text}");
    assert!(text.contains("`minLength: 1`"), "{text}");
}

#[test]
fn the_repositorys_examples_pass() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<String> = std::fs::read_dir(&examples)
        .expect("examples/ exists")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| p.display().to_string())
        .collect();
    files.sort();
    assert!(!files.is_empty());
    let args: Vec<&str> = files.iter().map(String::as_str).collect();
    let out = validate(&args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("baseline chat-production/chat): ok"));
}

#[test]
fn a_secrets_directory_of_empty_key_files_declares_key_names() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    for (secret, key) in [
        ("chat-jwt", "secret"),
        ("chat-db", "url"),
        ("chat-llm", "api-key"),
    ] {
        std::fs::create_dir_all(dir.path().join(secret)).unwrap();
        std::fs::write(dir.path().join(secret).join(key), "").unwrap();
    }
    let secrets = dir.path().display().to_string();
    let out = validate(&[
        "production.yaml",
        "staging.yaml",
        "--secrets",
        &secrets,
        "-o",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert_eq!(problems(&json(&out)), vec![]);

    std::fs::remove_file(dir.path().join("chat-llm").join("api-key")).unwrap();
    std::fs::write(dir.path().join("chat-llm").join("apikey"), "").unwrap();
    let out = validate(&[
        "production.yaml",
        "staging.yaml",
        "--secrets",
        &secrets,
        "-o",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let found = problems(&json(&out));
    assert!(
        found.contains(&triple(STAGING, "CHATGATE_LLM_API_KEY", "reference")),
        "{found:?}"
    );
    assert!(
        found.contains(&triple(
            "chat-production/chat",
            "CHATGATE_LLM_API_KEY",
            "reference"
        )),
        "directory Secrets match every namespace: {found:?}"
    );
}

#[test]
fn a_staging_database_secret_holding_a_sqlite_url_fails_validation_without_showing_it() {
    use base64::Engine;
    let secrets = std::fs::read_to_string(fixtures().join("staging-secrets.yaml")).unwrap();
    let sqlite =
        base64::engine::general_purpose::STANDARD.encode("sqlite:///var/lib/Hunter2-chat.db");
    let secrets = secrets.replace(
        "stringData:\n  url: postgres://chat:placeholder@db.chat-staging:5432/chat",
        &format!("data:\n  url: {sqlite}"),
    );
    assert!(
        secrets.contains(&sqlite),
        "the fixture still has chat-db's url"
    );
    let out = validate_with_stdin(
        &["production.yaml", "staging.yaml", "-", "-o", "json"],
        Some(&secrets),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let report = json(&out);
    let database: Vec<&serde_json::Value> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["resource"] == STAGING && p["key"] == "CHATGATE_DATABASE_URL")
        .collect();
    assert_eq!(database.len(), 1, "{report}");
    let message = database[0]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("SQLite") && message.contains("chat-db"),
        "{message}"
    );
    assert!(!stdout(&out).contains("Hunter2"), "the URL is a secret");

    // The same Secrets with the PostgreSQL URL pass.
    let fixed = std::fs::read_to_string(fixtures().join("staging-secrets.yaml")).unwrap();
    let out = validate_with_stdin(
        &["production.yaml", "staging.yaml", "-", "-o", "json"],
        Some(&fixed),
    );
    let report = json(&out);
    assert!(
        !problems(&report)
            .iter()
            .any(|(r, k, _)| r == STAGING && k == "CHATGATE_DATABASE_URL"),
        "{report}"
    );
}
