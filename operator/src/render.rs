//! `chatgate-operator render`: the children the operator would apply for ChatService
//! manifests, printed as YAML without a cluster (for review and GitOps diffs).

use crate::build::build;
use crate::configuration::declared_config;
use crate::crd::ChatService;
use chatgate_contract::config::Origin;
use kube::ResourceExt;
use serde::Deserialize;
use std::io::Read;
use std::path::PathBuf;

/// Print the children (ConfigMap, Deployment, Service, PodDisruptionBudget) of
/// ChatService manifests.
#[derive(Debug, Clone, clap::Args)]
pub struct RenderArgs {
    /// ChatService manifest (multi-document YAML); `-` reads standard input. Other
    /// kinds in the file are skipped.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: PathBuf,
    /// Namespace of ChatServices that name none.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
}

/// Renders and returns the YAML to print, or a message naming what could not be read.
pub fn render(args: &RenderArgs) -> Result<String, String> {
    let text = if args.file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| format!("reading standard input: {e}"))?;
        s
    } else {
        std::fs::read_to_string(&args.file)
            .map_err(|e| format!("reading {}: {e}", args.file.display()))?
    };
    render_text(&text, &args.namespace, &mut std::io::stderr())
}

/// The children of every ChatService in `text`; configuration problems are written to
/// `warnings` (the operator would refuse such a spec and keep the last good one).
pub fn render_text(
    text: &str,
    namespace: &str,
    warnings: &mut impl std::io::Write,
) -> Result<String, String> {
    let mut out = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = serde_norway::Value::deserialize(doc)
            .map_err(|e| format!("document {}: {e}", i + 1))?;
        if value.is_null() || value.get("kind").and_then(|k| k.as_str()) != Some("ChatService") {
            continue;
        }
        let mut cs: ChatService = serde_norway::from_value(value)
            .map_err(|e| format!("document {}: not a valid ChatService: {e}", i + 1))?;
        if cs.namespace().is_none() {
            cs.metadata.namespace = Some(namespace.to_owned());
        }
        let (config, mut problems) = declared_config(&cs.spec, None);
        problems.extend(config.validate(Origin::Manifest));
        for p in &problems {
            let _ = writeln!(warnings, "warning: ChatService {}: {p}", cs.name_any());
        }
        let yaml = build(&cs, &config)
            .to_yaml()
            .map_err(|e| format!("printing the children of {}: {e}", cs.name_any()))?;
        out.push(yaml);
    }
    if out.is_empty() {
        return Err("no ChatService in the input".into());
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
    fn bad_input_is_an_error_not_a_panic() {
        assert!(render_text("kind: ChatService\nspec: 7\n", "d", &mut Vec::new()).is_err());
        assert!(render_text(": : :", "d", &mut Vec::new()).is_err());
        assert!(render_text("", "d", &mut Vec::new()).is_err());
    }
}
