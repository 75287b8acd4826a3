//! The result of `validate`, as a table for people or JSON for tools.

use super::inputs::Origin;
use chatgate_contract::Environment;
use chatgate_contract::config::ProblemKind;
use serde::Serialize;

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
