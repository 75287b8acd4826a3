//! The `ChatService` status: conditions, replica counts, startup failures and
//! problems, decided by pure functions from what validation found and what the
//! cluster shows, with the clock passed in.
//!
//! kstatus rules: `Ready` is always present; `Reconciling` and `Stalled` appear only
//! while True; every condition carries the generation it describes, and its
//! `lastTransitionTime` moves only when its status flips ([`conditions::merge`]).

use crate::apply::Applied;
use crate::conditions::{self, Decided, reason};
use crate::crd::{ChatService, ChatServiceStatus, ConfigProblem, ParityMode, StartupFailure};
use crate::validation::Validation;
use chatgate_contract::TerminationMessage;
use chatgate_contract::config::{Problem, ProblemKind};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

/// Problems listed in a condition message before "and N more".
const PROBLEMS_IN_MESSAGE: usize = 3;

/// The Deployment's rollout as the status step needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rollout {
    /// The deployment controller has seen the Deployment's latest spec.
    pub observed: bool,
    /// Pods in total, old and new.
    pub replicas: i32,
    pub ready: i32,
    pub updated: i32,
    pub available: i32,
    /// The Deployment reports `Progressing=False` with `ProgressDeadlineExceeded`.
    pub deadline_exceeded: bool,
}

impl Rollout {
    /// What the Deployment's status shows.
    pub fn of(deployment: &Deployment) -> Rollout {
        let generation = deployment.metadata.generation;
        let Some(s) = deployment.status.as_ref() else {
            return Rollout::default();
        };
        Rollout {
            observed: generation.is_some() && s.observed_generation >= generation,
            replicas: s.replicas.unwrap_or(0),
            ready: s.ready_replicas.unwrap_or(0),
            updated: s.updated_replicas.unwrap_or(0),
            available: s.available_replicas.unwrap_or(0),
            deadline_exceeded: s.conditions.iter().flatten().any(|c| {
                c.type_ == "Progressing"
                    && c.status == conditions::FALSE
                    && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
            }),
        }
    }

    /// Every desired pod runs the latest template and is ready; no old pod is left
    /// (the same test as `kubectl rollout status`).
    pub fn complete(&self, desired: i32) -> bool {
        self.observed
            && self.updated == desired
            && self.replicas == desired
            && self.available == desired
            && self.ready == desired
    }
}

/// What the apply step did this reconcile, as the status step is told it.
#[derive(Debug, Clone)]
pub enum Applying<'a> {
    /// The children were applied (or already were as wanted).
    Applied(&'a Applied),
    /// Nothing was applied this time. `running` is the Deployment as the operator's
    /// watch cache last saw it, which keeps serving (`None`: there is none); its rollout
    /// is reported, but never as the applied one.
    NotApplied {
        why: NotApplied,
        running: Option<&'a Deployment>,
    },
}

/// Why nothing was applied this reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotApplied {
    /// Validation found a problem that blocks the rollout.
    Blocked,
    /// A request failed; the operator retries.
    Failed(String),
    /// A child's name is taken by an object this ChatService does not control.
    NotOwned(String),
}

/// Everything the status is decided from. Made only by [`Observed::new`] (the unit
/// tests beside this module set its fields directly).
#[derive(Debug, Clone)]
pub struct Observed<'a> {
    /// `metadata.generation` of the ChatService.
    generation: Option<i64>,
    /// `spec.replicas`.
    desired_replicas: i32,
    validation: &'a Validation,
    /// The Deployment's rollout; `None` while no Deployment exists.
    rollout: Option<Rollout>,
    /// Pods failing startup, from their termination messages.
    startup_failures: Vec<StartupFailure>,
    /// Config hash and generation now rolled out (`None` when nothing ever was).
    applied: Option<(String, i64)>,
    /// Why applying the children failed this time (the operator retries).
    apply_error: Option<String>,
    /// A child's name is taken by an object this ChatService does not control.
    not_owned: Option<String>,
}

impl<'a> Observed<'a> {
    /// What the status of `cs` is decided from: its validation, what the apply step
    /// did, and the pods failing startup.
    pub fn new(
        cs: &ChatService,
        validation: &'a Validation,
        applying: &Applying<'_>,
        startup_failures: Vec<StartupFailure>,
    ) -> Observed<'a> {
        let generation = cs.metadata.generation;
        let (rollout, applied_now, why) = match applying {
            Applying::Applied(applied) => (
                Some(Rollout::of(applied.deployment())),
                Some(applied.config_hash()),
                None,
            ),
            Applying::NotApplied { why, running } => (running.map(Rollout::of), None, Some(why)),
        };
        Observed {
            generation,
            desired_replicas: cs.spec.replicas,
            validation,
            rollout,
            startup_failures,
            applied: applied_config(cs.status.as_ref(), generation, applied_now),
            apply_error: match why {
                Some(NotApplied::Failed(e)) => Some(e.clone()),
                _ => None,
            },
            not_owned: match why {
                Some(NotApplied::NotOwned(e)) => Some(e.clone()),
                _ => None,
            },
        }
    }
}

/// The configuration hash the Deployment runs and the generation that first rolled it
/// out, as `status.appliedConfigHash` and `status.appliedGeneration` report them.
///
/// `applied_now` is the hash applied this reconcile (`None`: nothing was applied, so
/// what the previous status says still runs). Applying the configuration that already
/// runs keeps the generation that first rolled it out; a new configuration is the
/// current generation's.
pub fn applied_config(
    prev: Option<&ChatServiceStatus>,
    generation: Option<i64>,
    applied_now: Option<&str>,
) -> Option<(String, i64)> {
    let prev_hash = prev.and_then(|p| p.applied_config_hash.as_deref());
    let prev_generation = prev.and_then(|p| p.applied_generation);
    match applied_now {
        None => prev_hash
            .zip(prev_generation)
            .map(|(hash, g)| (hash.to_owned(), g)),
        Some(hash) if prev_hash == Some(hash) => {
            prev_generation.or(generation).map(|g| (hash.to_owned(), g))
        }
        Some(hash) => Some((hash.to_owned(), generation.unwrap_or(0))),
    }
}

/// The status to write, given the previous one and what was observed at `now`.
pub fn desired_status(
    prev: Option<&ChatServiceStatus>,
    o: &Observed<'_>,
    now: &Time,
) -> ChatServiceStatus {
    let decided = decide(o);
    let prev_conditions = prev.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    let rollout = o.rollout.clone().unwrap_or_default();
    ChatServiceStatus {
        observed_generation: o.generation,
        conditions: conditions::merge(prev_conditions, &decided, o.generation, now),
        replicas: Some(rollout.replicas),
        ready_replicas: Some(rollout.ready),
        updated_replicas: Some(rollout.updated),
        available_replicas: Some(rollout.available),
        replicas_ready: Some(format!("{}/{}", rollout.ready, o.desired_replicas)),
        startup_failures: o.startup_failures.clone(),
        problems: o
            .validation
            .all_problems()
            .map(|p| ConfigProblem {
                key: p.key.clone(),
                rule: p.kind.rule().to_owned(),
                message: format!("{}; {}", p.message, p.fix),
            })
            .collect(),
        applied_config_hash: o.applied.as_ref().map(|(h, _)| h.clone()),
        applied_generation: o.applied.as_ref().map(|(_, g)| *g),
    }
}

/// The conditions, in display order: Ready, Reconciling, Stalled, then details.
pub fn decide(o: &Observed<'_>) -> Vec<Decided> {
    use conditions::{CONFIG_VALID, PARITY_OK, READY, RECONCILING, STALLED, STARTUP_COMPLETE};
    let v = o.validation;
    let desired = o.desired_replicas;
    let keeps_serving = match (&o.applied, &o.rollout) {
        (Some((_, g)), Some(_)) => format!("; generation {g} keeps serving"),
        _ => String::new(),
    };

    let config_valid = if v.config_problems.is_empty() {
        Decided::new(
            CONFIG_VALID,
            true,
            reason::VALID,
            "the configuration is valid",
        )
    } else {
        Decided::new(
            CONFIG_VALID,
            false,
            config_reason(&v.config_problems),
            summarize(&v.config_problems),
        )
    };

    let parity = v.parity.as_ref().map(|p| {
        if p.problems.is_empty() {
            Decided::new(
                PARITY_OK,
                true,
                reason::IN_PARITY,
                format!("in parity with {}", p.baseline),
            )
        } else {
            let mode = match p.mode {
                ParityMode::Enforce => "enforced",
                ParityMode::Warn => "warning only",
            };
            Decided::new(
                PARITY_OK,
                false,
                parity_reason(&p.problems),
                format!(
                    "differs from {} ({mode}): {}",
                    p.baseline,
                    summarize(&p.problems)
                ),
            )
        }
    });

    let rollout = o.rollout.as_ref();
    let complete = rollout.is_some_and(|r| r.complete(desired));
    let ready_pods = rollout.map_or(0, |r| r.ready);

    let startup = if let Some(first) = o.startup_failures.first() {
        Decided::new(
            STARTUP_COMPLETE,
            false,
            reason::STARTUP_FAILED,
            failure_message(first, o.startup_failures.len()),
        )
    } else if complete {
        Decided::new(
            STARTUP_COMPLETE,
            true,
            reason::STARTUP_COMPLETE,
            format!("{desired}/{desired} pods started with every critical service"),
        )
    } else {
        Decided::new(
            STARTUP_COMPLETE,
            false,
            reason::STARTING,
            format!("{ready_pods}/{desired} pods started"),
        )
    };

    // Why it cannot progress, most fundamental first.
    let stalled: Option<(&'static str, String)> = if !v.config_problems.is_empty() {
        Some((
            config_valid.reason,
            format!("{}{keeps_serving}", config_valid.message),
        ))
    } else if let Some(p) = v
        .parity
        .as_ref()
        .filter(|p| v.blocks_rollout() && !p.problems.is_empty())
    {
        Some((
            parity_reason(&p.problems),
            format!(
                "parity with {} is enforced: {}{keeps_serving}",
                p.baseline,
                summarize(&p.problems)
            ),
        ))
    } else if let Some(m) = &o.not_owned {
        Some((reason::CHILD_NOT_OWNED, m.clone()))
    } else if let Some(first) = o.startup_failures.first() {
        Some((
            reason::STARTUP_FAILED,
            failure_message(first, o.startup_failures.len()),
        ))
    } else if rollout.is_some_and(|r| r.deadline_exceeded) {
        Some((
            reason::PROGRESS_DEADLINE_EXCEEDED,
            format!(
                "the rollout made no progress for spec.rollout.progressDeadlineSeconds; {ready_pods}/{desired} pods ready"
            ),
        ))
    } else {
        None
    };

    let reconciling: Option<(&'static str, String)> = match (stalled.is_some(), rollout) {
        (true, _) => None,
        (false, _) if o.apply_error.is_some() => Some((
            reason::APPLY_FAILED,
            format!(
                "applying the children failed, retrying: {}",
                o.apply_error.as_deref().unwrap_or_default()
            ),
        )),
        (false, None) => Some((reason::CREATING, "creating the Deployment".to_owned())),
        (false, Some(r)) if !complete => {
            // Until the deployment controller has seen the new template, the
            // Deployment's counts describe the previous one: "2/2 updated" would be
            // untrue.
            let updated = if r.observed {
                format!("{}/{desired} pods updated,", r.updated.min(desired))
            } else {
                "waiting for the deployment controller to take up the new Deployment;".to_owned()
            };
            Some((
                reason::ROLLING_OUT,
                format!(
                    "rolling out generation {}: {updated} {}/{desired} ready",
                    o.generation.unwrap_or(0),
                    r.ready
                ),
            ))
        }
        _ => None,
    };

    let ready = match (&stalled, &reconciling) {
        (Some((r, m)), _) | (None, Some((r, m))) => Decided::new(READY, false, r, m.clone()),
        (None, None) => Decided::new(
            READY,
            true,
            reason::READY,
            format!("{ready_pods}/{desired} pods ready"),
        ),
    };

    let mut out = vec![ready];
    if let Some((r, m)) = reconciling {
        out.push(Decided::new(RECONCILING, true, r, m));
    }
    if let Some((r, m)) = stalled {
        out.push(Decided::new(STALLED, true, r, m));
    }
    out.push(config_valid);
    out.extend(parity);
    out.push(startup);
    out
}

fn config_reason(problems: &[Problem]) -> &'static str {
    if problems
        .iter()
        .any(|p| p.kind == ProblemKind::MissingReference)
    {
        reason::MISSING_REFERENCE
    } else {
        reason::INVALID_CONFIG
    }
}

fn parity_reason(problems: &[Problem]) -> &'static str {
    if problems
        .iter()
        .any(|p| p.kind == ProblemKind::BaselineMissing)
    {
        reason::BASELINE_MISSING
    } else {
        reason::PARITY_VIOLATION
    }
}

/// "KEY: message; KEY2: message (and 3 more, see status.problems)".
pub fn summarize(problems: &[Problem]) -> String {
    let mut s = problems
        .iter()
        .take(PROBLEMS_IN_MESSAGE)
        .map(|p| format!("{}: {}", p.key, p.message))
        .collect::<Vec<_>>()
        .join("; ");
    if problems.len() > PROBLEMS_IN_MESSAGE {
        s.push_str(&format!(
            " (and {} more, see status.problems)",
            problems.len() - PROBLEMS_IN_MESSAGE
        ));
    }
    s
}

/// "pod x: agent supervisor missing: LLM API key missing" (+ how many others fail).
fn failure_message(first: &StartupFailure, count: usize) -> String {
    let others = match count {
        0 | 1 => String::new(),
        2 => " (and 1 more pod)".to_owned(),
        n => format!(" (and {} more pods)", n - 1),
    };
    format!("pod {}: {}{others}", first.pod, first.message)
}

/// Pods whose service container is not ready and last exited with a chatgate
/// termination message, sorted by pod name. Other exits (OOM, image errors) are left
/// to the progress deadline: only the service's own message names a phase.
pub fn startup_failures(pods: &[Pod], container: &str) -> Vec<StartupFailure> {
    let mut out: Vec<StartupFailure> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|pod| {
            let cs: &ContainerStatus = pod
                .status
                .as_ref()?
                .container_statuses
                .as_ref()?
                .iter()
                .find(|c| c.name == container)?;
            if cs.ready {
                return None;
            }
            let terminated = |s: Option<&k8s_openapi::api::core::v1::ContainerState>| {
                s.and_then(|s| s.terminated.as_ref())
                    .and_then(|t| t.message.clone())
            };
            let raw =
                terminated(cs.state.as_ref()).or_else(|| terminated(cs.last_state.as_ref()))?;
            let parsed: TerminationMessage = raw.parse().ok()?;
            Some(StartupFailure {
                pod: pod.name_any(),
                phase: Some(parsed.phase.as_str().to_owned()),
                service: parsed.service.map(|s| s.as_str().to_owned()),
                message: parsed.summary(),
                restart_count: Some(cs.restart_count),
            })
        })
        .collect();
    out.sort_by(|a, b| a.pod.cmp(&b.pod));
    out
}

/// A condition that changed status or reason, or appeared with a problem: one Event
/// each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
    /// Shown as a Warning event (something a person must fix).
    pub warning: bool,
}

/// The transitions from `prev` to `next` conditions: a condition whose status or
/// reason changed or that appeared (`Reconciling` when a rollout starts, `Stalled`).
/// A new ChatService's first conditions are news only when they name a problem: its
/// `ConfigValid=True`, `Reconciling=True: Creating` and the rest say nothing `kubectl
/// get` does not, and with 500 ChatServices created at once those six Events each
/// were a third of the API server's requests.
pub fn transitions(
    prev: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    next: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> Vec<Transition> {
    const PROBLEM_REASONS: &[&str] = &[
        reason::INVALID_CONFIG,
        reason::MISSING_REFERENCE,
        reason::PARITY_VIOLATION,
        reason::BASELINE_MISSING,
        reason::STARTUP_FAILED,
        reason::PROGRESS_DEADLINE_EXCEEDED,
        reason::CHILD_NOT_OWNED,
    ];
    next.iter()
        .filter_map(|n| {
            let warning = PROBLEM_REASONS.contains(&n.reason.as_str());
            let news = match prev.iter().find(|p| p.type_ == n.type_) {
                Some(p) => p.status != n.status || p.reason != n.reason,
                None => warning || !prev.is_empty(),
            };
            news.then(|| Transition {
                type_: n.type_.clone(),
                status: n.status.clone(),
                reason: n.reason.clone(),
                message: n.message.clone(),
                warning,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
