//! `chatgate-operator render`: what a ChatService becomes on a target, printed as YAML
//! without a cluster — the children the operator would apply (Kubernetes), or the
//! Knative Service for Cloud Run or Knative Serving — for review, GitOps and deploys.

use crate::build::build;
use crate::crd::ChatService;
use crate::serverless::{self, Target};
use crate::validation::ValidatedSpec;
use kube::ResourceExt;
use serde::Deserialize;
use std::io::Read;
use std::path::PathBuf;

/// Print what ChatService manifests become on a target.
#[derive(Debug, Clone, clap::Args)]
pub struct RenderArgs {
    /// ChatService manifest (multi-document YAML); `-` reads standard input. Other
    /// kinds in the file are skipped.
    #[arg(value_name = "FILE", required_unless_present = "filename")]
    pub file: Option<PathBuf>,
    /// The same as FILE, as `kubectl -f` spells it.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE",
        conflicts_with = "file"
    )]
    pub filename: Option<PathBuf>,
    /// Namespace of ChatServices that name none.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// `kubernetes`: the children the operator applies; `cloudrun`: a Cloud Run service
    /// for `gcloud run services replace`; `knative`: a Knative Serving Service.
    #[arg(short = 't', long, value_enum, default_value_t = Target::Kubernetes)]
    pub target: Target,
    /// Cloud Run and Knative: the Google Cloud project, set as `GOOGLE_CLOUD_PROJECT` so
    /// the service's log lines name their trace as `projects/PROJECT/traces/ID`.
    #[arg(long, value_name = "PROJECT")]
    pub project: Option<String>,
}

/// Why nothing was rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenderError {
    /// The input could not be read or is not ChatService manifests (exit 2).
    Unreadable(String),
    /// A ChatService asks for what the target cannot do (exit 1); one line each.
    Refused(Vec<String>),
}

/// Renders and returns the YAML to print.
pub fn render(args: &RenderArgs) -> Result<String, RenderError> {
    let Some(file) = args.file.as_ref().or(args.filename.as_ref()) else {
        return Err(RenderError::Unreadable("no FILE given".into()));
    };
    let text = if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| RenderError::Unreadable(format!("reading standard input: {e}")))?;
        s
    } else {
        std::fs::read_to_string(file)
            .map_err(|e| RenderError::Unreadable(format!("reading {}: {e}", file.display())))?
    };
    render_with(
        &text,
        &args.namespace,
        args.target,
        args.project.as_deref(),
        &mut std::io::stderr(),
    )
}

/// The children of every ChatService in `text` (the Kubernetes target).
pub fn render_text(
    text: &str,
    namespace: &str,
    warnings: &mut impl std::io::Write,
) -> Result<String, String> {
    render_target(text, namespace, Target::Kubernetes, warnings).map_err(|e| match e {
        RenderError::Unreadable(m) => m,
        RenderError::Refused(lines) => lines.join("\n"),
    })
}

/// What every ChatService in `text` becomes on `target`; configuration problems are
/// written to `warnings` (the operator would refuse such a spec and keep the last good
/// one). Nothing is rendered when any ChatService asks for what the target cannot do.
pub fn render_target(
    text: &str,
    namespace: &str,
    target: Target,
    warnings: &mut impl std::io::Write,
) -> Result<String, RenderError> {
    render_with(text, namespace, target, None, warnings)
}

/// [`render_target`], with the Google Cloud project for Cloud Run and Knative.
pub fn render_with(
    text: &str,
    namespace: &str,
    target: Target,
    project: Option<&str>,
    warnings: &mut impl std::io::Write,
) -> Result<String, RenderError> {
    let mut out = Vec::new();
    let mut refused = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = serde_norway::Value::deserialize(doc)
            .map_err(|e| RenderError::Unreadable(format!("document {}: {e}", i + 1)))?;
        if value.is_null() || value.get("kind").and_then(|k| k.as_str()) != Some("ChatService") {
            continue;
        }
        let mut cs: ChatService = serde_norway::from_value(value).map_err(|e| {
            RenderError::Unreadable(format!("document {}: not a valid ChatService: {e}", i + 1))
        })?;
        if cs.namespace().is_none() {
            cs.metadata.namespace = Some(namespace.to_owned());
        }
        // Offline nothing is read: no ConfigMap, no Secrets, no baseline.
        let (spec, problems) = ValidatedSpec::declared(&cs, None);
        let config = spec.config();
        for p in &problems {
            let _ = writeln!(warnings, "warning: ChatService {}: {p}", cs.name_any());
        }
        let name = cs.name_any();
        let printed = match target {
            Target::Kubernetes => build(&cs, &spec).to_yaml(),
            Target::Cloudrun | Target::Knative => {
                let refusals = serverless::refusals(&cs, config, target);
                if !refusals.is_empty() {
                    refused.extend(refusals.iter().map(|r| {
                        format!("ChatService {name}: cannot run on {}: {r}", target.as_str())
                    }));
                    continue;
                }
                for note in serverless::notes(config, target) {
                    let _ = writeln!(warnings, "note: ChatService {name}: {note}");
                }
                let mut service = serverless::knative_service(&cs, config, target);
                if let Some(project) = project {
                    service.set_env("GOOGLE_CLOUD_PROJECT", project);
                }
                service.to_yaml()
            }
        };
        out.push(
            printed.map_err(|e| {
                RenderError::Unreadable(format!("printing what {name} becomes: {e}"))
            })?,
        );
    }
    if !refused.is_empty() {
        return Err(RenderError::Refused(refused));
    }
    if out.is_empty() {
        return Err(RenderError::Unreadable(
            "no ChatService (apiVersion chatgate.dev/v1alpha1) in the input".into(),
        ));
    }
    Ok(out.join("---\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_chat_service_and_skips_other_kinds() {
        let text = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n---\napiVersion: chatgate.dev/v1alpha1\nkind: ChatService\nmetadata: {name: a}\nspec: {image: x, environment: development, replicas: 2}\n---\napiVersion: chatgate.dev/v1alpha1\nkind: ChatService\nmetadata: {name: b, namespace: team}\nspec: {image: y, environment: development}\n";
        let mut warnings = Vec::new();
        let yaml = render_text(text, "default", &mut warnings).unwrap();
        assert_eq!(yaml.matches("kind: Deployment").count(), 2);
        assert_eq!(yaml.matches("kind: PodDisruptionBudget").count(), 1);
        assert!(yaml.contains("namespace: team"));
        assert!(
            warnings.is_empty(),
            "{}",
            String::from_utf8_lossy(&warnings)
        );
    }

    #[test]
    fn configuration_problems_are_warned_about() {
        let text = "apiVersion: chatgate.dev/v1alpha1\nkind: ChatService\nmetadata: {name: a}\nspec: {image: x, environment: staging}\n";
        let mut warnings = Vec::new();
        render_text(text, "default", &mut warnings).unwrap();
        assert!(String::from_utf8_lossy(&warnings).contains("CHATGATE_JWT"));
    }

    #[test]
    fn cloud_run_renders_one_knative_service_per_chat_service() {
        let text = "apiVersion: chatgate.dev/v1alpha1\nkind: ChatService\nmetadata: {name: a}\nspec: {image: x, environment: development}\n";
        let yaml = render_target(text, "d", Target::Cloudrun, &mut Vec::new()).unwrap();
        assert!(
            yaml.contains("apiVersion: serving.knative.dev/v1"),
            "{yaml}"
        );
        assert!(!yaml.contains("kind: Deployment"));
    }

    #[test]
    fn what_cloud_run_cannot_do_is_refused_naming_the_field_and_the_limit() {
        let text = "apiVersion: chatgate.dev/v1alpha1\nkind: ChatService\nmetadata: {name: a}\nspec: {image: x, environment: development, startup: {budgetSeconds: 300, periodSeconds: 5}, rollout: {drainSeconds: 30}}\n";
        let Err(RenderError::Refused(lines)) =
            render_target(text, "d", Target::Cloudrun, &mut Vec::new())
        else {
            panic!("not refused");
        };
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].starts_with(
                "ChatService a: cannot run on cloudrun: spec.startup.budgetSeconds: is 300 s"
            ),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].contains("spec.rollout.drainSeconds"),
            "{}",
            lines[1]
        );
        // The same spec runs on Kubernetes.
        assert!(render_target(text, "d", Target::Kubernetes, &mut Vec::new()).is_ok());
    }

    #[test]
    fn the_project_becomes_google_cloud_project() {
        let text = "apiVersion: chatgate.dev/v1alpha1\nkind: ChatService\nmetadata: {name: a}\nspec: {image: x, environment: development}\n";
        let yaml = render_with(text, "d", Target::Cloudrun, Some("acme"), &mut Vec::new()).unwrap();
        assert!(
            yaml.contains("- name: GOOGLE_CLOUD_PROJECT\n          value: acme\n"),
            "{yaml}"
        );
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert!(render_text("kind: ChatService\nspec: 7\n", "d", &mut Vec::new()).is_err());
        assert!(render_text(": : :", "d", &mut Vec::new()).is_err());
        assert!(render_text("", "d", &mut Vec::new()).is_err());
    }
}
