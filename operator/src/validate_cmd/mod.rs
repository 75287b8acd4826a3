//! `chatgate-operator validate`: the operator's validation, offline, for a pipeline.
//!
//! Reads manifests as `kustomize build` or `helm template` print them (multi-document
//! YAML, `-` for standard input), pairs every non-production ChatService with its
//! production baseline from the same inputs, and runs [`crate::validation::evaluate`] — the
//! very function the operator runs before a rollout — on each. Secrets and
//! ConfigMaps among the inputs (or in `--secrets DIR`) stand in for the cluster's.
//! What the API server would refuse on `kubectl apply` is reported too: fields the
//! ChatService types do not have, and the CRD's CEL rules, run offline.
//!
//! One module per seam: `inputs` reads the manifests, `schema` says what the API
//! server would refuse, `checks` runs every check, `report` prints the result.
//!
//! Exit codes: 0 clean (warnings allowed), 1 a problem that would block the rollout,
//! 2 input that cannot be read or parsed (reported with file, line and column).

mod checks;
mod inputs;
mod report;
mod schema;

pub use crate::manifests::InputError;
pub use inputs::Origin;
pub use report::{ProblemRow, Report, ResourceSummary, Severity};

use crate::serverless::Target;
use chatgate_contract::config::{self, KEYS};
use inputs::Inputs;
use std::io::{Read, Write};
use std::path::PathBuf;

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
