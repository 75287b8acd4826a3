//! The checks `validate` runs on each ChatService read: what the API server would
//! refuse, the operator's own validation ([`validation::evaluate`]), what the deploy
//! target cannot do, and parity with the production baseline.

use super::inputs::Inputs;
use super::report::{ProblemRow, Report, ResourceSummary, Severity};
use super::schema::unknown_field_problem;
use crate::crd::ParityMode;
use crate::dereference;
use crate::serverless::{self, Target};
use crate::validation;
use chatgate_contract::config::{Problem, ProblemKind};

impl Inputs {
    /// Every check on every ChatService read: the report `validate` prints.
    pub(super) fn report(&self) -> Report {
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

#[cfg(test)]
mod tests {
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
