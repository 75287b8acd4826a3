//! Status decisions, with a fixed clock.

use super::*;
use crate::conditions::{
    CONFIG_VALID, PARITY_OK, READY, RECONCILING, STALLED, STARTUP_COMPLETE, find, is_true,
};
use crate::validation::ParityOutcome;
use chatgate_contract::Environment;
use k8s_openapi::jiff::Timestamp;

fn at(secs: i64) -> Time {
    Time(Timestamp::from_second(secs).unwrap())
}

fn rollout(desired: i32, updated: i32, ready: i32) -> Rollout {
    Rollout {
        observed: true,
        replicas: desired.max(updated),
        ready,
        updated,
        available: ready,
        deadline_exceeded: false,
    }
}

fn observed<'a>(v: &'a Validation, r: Option<Rollout>) -> Observed<'a> {
    Observed {
        generation: Some(2),
        desired_replicas: 2,
        validation: v,
        rollout: r,
        startup_failures: vec![],
        applied: Some(("h".into(), 2)),
        apply_error: None,
        not_owned: None,
    }
}

/// What validation found, as the status step reads it.
#[derive(Default)]
struct Found {
    config_problems: Vec<Problem>,
    parity: Option<ParityOutcome>,
}

fn found(f: Found) -> Validation {
    let mut v = Validation::default();
    v.config_problems = f.config_problems;
    v.parity = f.parity;
    v
}

fn problem(key: &str, kind: ProblemKind) -> Problem {
    Problem::new(
        key,
        Environment::Staging,
        kind,
        format!("{key} is wrong"),
        "fix it",
    )
}

fn types(s: &ChatServiceStatus) -> Vec<&str> {
    s.conditions.iter().map(|c| c.type_.as_str()).collect()
}

#[test]
fn a_complete_rollout_is_ready_without_reconciling_or_stalled() {
    let v = Validation::default();
    let s = desired_status(None, &observed(&v, Some(rollout(2, 2, 2))), &at(1));
    assert_eq!(types(&s), [READY, CONFIG_VALID, STARTUP_COMPLETE]);
    assert!(is_true(&s.conditions, READY));
    assert_eq!(s.replicas_ready.as_deref(), Some("2/2"));
    assert_eq!(s.observed_generation, Some(2));
    assert!(
        s.conditions
            .iter()
            .all(|c| c.observed_generation == Some(2))
    );
}

#[test]
fn a_rollout_in_progress_is_reconciling_and_not_ready() {
    let v = Validation::default();
    let s = desired_status(None, &observed(&v, Some(rollout(2, 1, 1))), &at(1));
    assert_eq!(
        types(&s),
        [READY, RECONCILING, CONFIG_VALID, STARTUP_COMPLETE]
    );
    let r = find(&s.conditions, RECONCILING).unwrap();
    assert_eq!(
        (r.status.as_str(), r.reason.as_str()),
        ("True", "RollingOut")
    );
    assert_eq!(find(&s.conditions, READY).unwrap().reason, "RollingOut");
    // Not observed by the deployment controller yet: still rolling out.
    let mut r = rollout(2, 2, 2);
    r.observed = false;
    let s = desired_status(None, &observed(&v, Some(r)), &at(1));
    assert!(is_true(&s.conditions, RECONCILING));
    // No Deployment yet.
    let s = desired_status(None, &observed(&v, None), &at(1));
    assert_eq!(find(&s.conditions, RECONCILING).unwrap().reason, "Creating");
}

#[test]
fn old_pods_still_running_keep_it_reconciling() {
    let v = Validation::default();
    let mut r = rollout(2, 2, 2);
    r.replicas = 3;
    let s = desired_status(None, &observed(&v, Some(r)), &at(1));
    assert!(is_true(&s.conditions, RECONCILING));
    assert!(!is_true(&s.conditions, READY));
}

#[test]
fn invalid_config_stalls_and_names_every_key_while_the_old_generation_serves() {
    let v = found(Found {
        config_problems: vec![
            problem("CHATGATE_LLM_API_KEY", ProblemKind::MissingReference),
            problem("CHATGATE_JWT_ISSUER", ProblemKind::Required),
        ],
        ..Found::default()
    });
    let mut o = observed(&v, Some(rollout(2, 2, 2)));
    o.generation = Some(3);
    let s = desired_status(None, &o, &at(1));
    assert_eq!(types(&s), [READY, STALLED, CONFIG_VALID, STARTUP_COMPLETE]);
    let stalled = find(&s.conditions, STALLED).unwrap();
    assert_eq!(stalled.reason, "MissingReference");
    assert!(
        stalled.message.contains("CHATGATE_LLM_API_KEY"),
        "{}",
        stalled.message
    );
    assert!(
        stalled.message.contains("generation 2 keeps serving"),
        "{}",
        stalled.message
    );
    let ready = find(&s.conditions, READY).unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "MissingReference")
    );
    assert_eq!(find(&s.conditions, CONFIG_VALID).unwrap().status, "False");
    assert_eq!(s.problems.len(), 2);
    assert_eq!(s.problems[0].rule, "reference");
    assert_eq!(s.applied_generation, Some(2));
}

#[test]
fn enforced_parity_violation_stalls_and_warn_only_reports() {
    let parity = |mode| {
        found(Found {
            parity: Some(ParityOutcome {
                baseline: "prod/chat".into(),
                mode,
                problems: vec![problem("CHATGATE_JWT_ALGORITHM", ProblemKind::ParityMatch)],
            }),
            ..Found::default()
        })
    };
    let enforce = parity(ParityMode::Enforce);
    let s = desired_status(None, &observed(&enforce, Some(rollout(2, 2, 2))), &at(1));
    assert_eq!(
        find(&s.conditions, STALLED).unwrap().reason,
        "ParityViolation"
    );
    assert_eq!(find(&s.conditions, PARITY_OK).unwrap().status, "False");
    let warn = parity(ParityMode::Warn);
    let s = desired_status(None, &observed(&warn, Some(rollout(2, 2, 2))), &at(1));
    assert!(find(&s.conditions, STALLED).is_none());
    assert!(is_true(&s.conditions, READY));
    let p = find(&s.conditions, PARITY_OK).unwrap();
    assert_eq!(
        (p.status.as_str(), p.reason.as_str()),
        ("False", "ParityViolation")
    );
    assert!(p.message.contains("warning only"));
}

#[test]
fn a_missing_baseline_is_named_as_such() {
    let v = found(Found {
        parity: Some(ParityOutcome {
            baseline: "prod/chat".into(),
            mode: ParityMode::Enforce,
            problems: vec![problem(
                "spec.parity.baseline",
                ProblemKind::BaselineMissing,
            )],
        }),
        ..Found::default()
    });
    let s = desired_status(None, &observed(&v, Some(rollout(2, 2, 2))), &at(1));
    assert_eq!(
        find(&s.conditions, STALLED).unwrap().reason,
        "BaselineMissing"
    );
}

#[test]
fn parity_in_order_is_reported_true() {
    let v = found(Found {
        parity: Some(ParityOutcome {
            baseline: "prod/chat".into(),
            mode: ParityMode::Enforce,
            problems: vec![],
        }),
        ..Found::default()
    });
    let s = desired_status(None, &observed(&v, Some(rollout(2, 2, 2))), &at(1));
    assert!(is_true(&s.conditions, PARITY_OK));
    assert!(is_true(&s.conditions, READY));
}

#[test]
fn startup_failure_stalls_with_the_pod_and_the_service_in_the_message() {
    let v = Validation::default();
    let mut o = observed(&v, Some(rollout(2, 2, 0)));
    o.startup_failures = vec![StartupFailure {
        pod: "chat-abc".into(),
        phase: Some("supervisor".into()),
        service: Some("agent_supervisor".into()),
        message: "agent supervisor missing: LLM API key missing".into(),
        restart_count: Some(3),
    }];
    let s = desired_status(None, &o, &at(1));
    let stalled = find(&s.conditions, STALLED).unwrap();
    assert_eq!(stalled.reason, "StartupFailed");
    assert_eq!(
        stalled.message,
        "pod chat-abc: agent supervisor missing: LLM API key missing"
    );
    let ready = find(&s.conditions, READY).unwrap();
    assert_eq!(
        ready.message, stalled.message,
        "the printer column shows the cause"
    );
    assert!(
        find(&s.conditions, RECONCILING).is_none(),
        "Stalled and Reconciling never together"
    );
    assert_eq!(
        find(&s.conditions, STARTUP_COMPLETE).unwrap().reason,
        "StartupFailed"
    );
}

#[test]
fn progress_deadline_exceeded_stalls() {
    let v = Validation::default();
    let mut r = rollout(2, 1, 1);
    r.deadline_exceeded = true;
    let s = desired_status(None, &observed(&v, Some(r)), &at(1));
    assert_eq!(
        find(&s.conditions, STALLED).unwrap().reason,
        "ProgressDeadlineExceeded"
    );
    assert!(find(&s.conditions, RECONCILING).is_none());
}

#[test]
fn a_resync_with_nothing_new_produces_an_identical_status() {
    let v = Validation::default();
    let o = observed(&v, Some(rollout(2, 2, 2)));
    let first = desired_status(None, &o, &at(1));
    // Round trip through JSON as the API server stores it.
    let stored: ChatServiceStatus =
        serde_json::from_value(serde_json::to_value(&first).unwrap()).unwrap();
    let again = desired_status(Some(&stored), &o, &at(500));
    assert_eq!(stored, again);
}

#[test]
fn ready_keeps_its_transition_time_until_it_flips() {
    let v = Validation::default();
    let s1 = desired_status(None, &observed(&v, Some(rollout(2, 2, 2))), &at(10));
    let s2 = desired_status(Some(&s1), &observed(&v, Some(rollout(2, 2, 2))), &at(20));
    assert_eq!(
        find(&s2.conditions, READY).unwrap().last_transition_time,
        at(10)
    );
    let s3 = desired_status(Some(&s2), &observed(&v, Some(rollout(2, 1, 1))), &at(30));
    assert_eq!(
        find(&s3.conditions, READY).unwrap().last_transition_time,
        at(30)
    );
    assert_eq!(
        find(&s3.conditions, CONFIG_VALID)
            .unwrap()
            .last_transition_time,
        at(10)
    );
}

#[test]
fn many_problems_are_summarised() {
    let ps: Vec<Problem> = (0..5)
        .map(|i| problem(&format!("K{i}"), ProblemKind::Required))
        .collect();
    let s = summarize(&ps);
    assert!(s.contains("K0") && s.contains("K2") && !s.contains("K3"));
    assert!(s.ends_with("(and 2 more, see status.problems)"));
}

fn pod(name: &str, ready: bool, last: Option<&str>, current: Option<&str>) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "status": {"containerStatuses": [{
            "name": "chatgate", "ready": ready, "restartCount": 2, "image": "x", "imageID": "",
            "state": current.map_or(serde_json::json!({"waiting": {"reason": "CrashLoopBackOff"}}),
                |m| serde_json::json!({"terminated": {"exitCode": 1, "message": m}})),
            "lastState": last.map_or(serde_json::json!({}),
                |m| serde_json::json!({"terminated": {"exitCode": 1, "message": m}})),
        }]},
    }))
    .unwrap()
}

#[test]
fn startup_failures_are_read_from_termination_messages() {
    let msg = "phase=supervisor service=agent_supervisor: LLM API key missing";
    let pods = vec![
        pod("b", false, Some(msg), None),
        pod(
            "a",
            false,
            None,
            Some("phase=llm service=llm_client: base URL unreachable"),
        ),
        pod("ok", true, Some(msg), None),
        pod("other", false, Some("OOMKilled"), None),
    ];
    let f = startup_failures(&pods, "chatgate");
    assert_eq!(f.len(), 2, "{f:?}");
    assert_eq!(f[0].pod, "a");
    assert_eq!(
        f[1].message,
        "agent supervisor missing: LLM API key missing"
    );
    assert_eq!(f[1].phase.as_deref(), Some("supervisor"));
    assert_eq!(f[1].service.as_deref(), Some("agent_supervisor"));
    assert_eq!(f[1].restart_count, Some(2));
    assert!(startup_failures(&pods, "sidecar").is_empty());
}

#[test]
fn transitions_are_new_or_changed_conditions_only() {
    let v = Validation::default();
    let a = desired_status(None, &observed(&v, Some(rollout(2, 1, 1))), &at(1));
    // A healthy first status is no news: no Event for any of its conditions.
    assert!(a.conditions.len() >= 4);
    assert!(transitions(&[], &a.conditions).is_empty());
    assert!(transitions(&a.conditions, &a.conditions).is_empty());
    let b = desired_status(Some(&a), &observed(&v, Some(rollout(2, 2, 2))), &at(2));
    let t = transitions(&a.conditions, &b.conditions);
    let names: Vec<_> = t.iter().map(|t| t.type_.as_str()).collect();
    assert_eq!(names, [READY, STARTUP_COMPLETE]);
    let bad = found(Found {
        config_problems: vec![problem("X", ProblemKind::Required)],
        ..Found::default()
    });
    let c = desired_status(Some(&b), &observed(&bad, Some(rollout(2, 2, 2))), &at(3));
    let t = transitions(&b.conditions, &c.conditions);
    assert!(t.iter().any(|t| t.type_ == STALLED && t.warning));
    // A first status that names a problem says so at once, and only the problem.
    let first = desired_status(None, &observed(&bad, None), &at(1));
    let t = transitions(&[], &first.conditions);
    assert!(!t.is_empty());
    assert!(t.iter().all(|t| t.warning), "{t:?}");
    assert!(t.iter().any(|t| t.type_ == STALLED));
    // A condition that appears on a ChatService that has a status is news: here
    // `Reconciling` when a new rollout starts.
    let d = desired_status(Some(&b), &observed(&v, Some(rollout(2, 1, 2))), &at(4));
    assert!(find(&b.conditions, RECONCILING).is_none());
    let t = transitions(&b.conditions, &d.conditions);
    assert!(
        t.iter().any(|t| t.type_ == RECONCILING && !t.warning),
        "{t:?}"
    );
}

#[test]
fn a_failed_apply_is_reported_as_reconciling_and_not_ready() {
    let v = Validation::default();
    let mut o = observed(&v, Some(rollout(2, 2, 2)));
    o.apply_error = Some("applying Service ns/chat: range is full".into());
    let s = desired_status(None, &o, &at(1));
    let r = find(&s.conditions, RECONCILING).unwrap();
    assert_eq!(r.reason, "ApplyFailed");
    assert!(r.message.contains("range is full"));
    let ready = find(&s.conditions, READY).unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "ApplyFailed")
    );
    assert!(find(&s.conditions, STALLED).is_none());
}

fn applied_before(hash: Option<&str>, generation: Option<i64>) -> ChatServiceStatus {
    ChatServiceStatus {
        applied_config_hash: hash.map(str::to_owned),
        applied_generation: generation,
        ..ChatServiceStatus::default()
    }
}

#[test]
fn a_first_apply_is_the_current_generations() {
    assert_eq!(
        applied_config(None, Some(4), Some("h1")),
        Some(("h1".into(), 4))
    );
    // A ChatService without a generation (not from the API server) counts as 0.
    assert_eq!(
        applied_config(None, None, Some("h1")),
        Some(("h1".into(), 0))
    );
}

#[test]
fn reapplying_the_running_configuration_keeps_the_generation_that_rolled_it_out() {
    let prev = applied_before(Some("h1"), Some(2));
    assert_eq!(
        applied_config(Some(&prev), Some(5), Some("h1")),
        Some(("h1".into(), 2))
    );
    // A status that lost its generation takes the current one.
    let prev = applied_before(Some("h1"), None);
    assert_eq!(
        applied_config(Some(&prev), Some(5), Some("h1")),
        Some(("h1".into(), 5))
    );
}

#[test]
fn a_new_configuration_is_the_current_generations() {
    let prev = applied_before(Some("h1"), Some(2));
    assert_eq!(
        applied_config(Some(&prev), Some(5), Some("h2")),
        Some(("h2".into(), 5))
    );
}

#[test]
fn when_nothing_is_applied_the_previous_configuration_still_runs() {
    let prev = applied_before(Some("h1"), Some(2));
    assert_eq!(
        applied_config(Some(&prev), Some(5), None),
        Some(("h1".into(), 2))
    );
    assert_eq!(applied_config(None, Some(5), None), None);
    // Half a record says nothing reliable.
    let half = applied_before(Some("h1"), None);
    assert_eq!(applied_config(Some(&half), Some(5), None), None);
}

#[test]
fn a_deployment_not_applied_this_time_is_observed_but_not_taken_as_applied() {
    let cs = ChatService::test("chat").stored("u", 7).build();
    let v = Validation::default();
    let running = Deployment::default();
    let o = Observed::new(
        &cs,
        &v,
        &Applying::NotApplied {
            why: NotApplied::Failed("boom".into()),
            running: Some(&running),
        },
        vec![],
    );
    assert_eq!(o.rollout, Some(Rollout::default()));
    assert_eq!(o.applied, None);
    assert_eq!(o.apply_error.as_deref(), Some("boom"));
    assert_eq!(o.not_owned, None);
    assert_eq!(o.generation, Some(7));
}

#[test]
fn a_rollout_the_deployment_controller_has_not_seen_claims_no_updated_pods() {
    let v = Validation::default();
    // Just after a new template is applied the Deployment still counts the old pods as
    // updated and ready.
    let stale = Rollout {
        observed: false,
        ..rollout(2, 2, 2)
    };
    let s = desired_status(None, &observed(&v, Some(stale)), &at(1));
    let r = find(&s.conditions, RECONCILING).unwrap();
    assert_eq!(r.reason, reason::ROLLING_OUT);
    assert!(!r.message.contains("updated"), "{}", r.message);
    assert!(r.message.contains("deployment controller"), "{}", r.message);
    assert!(r.message.contains("2/2 ready"), "{}", r.message);
    let ready = find(&s.conditions, READY).unwrap();
    assert_eq!(ready.status, "False");
    // Once it has, the counts are the new template's.
    let s = desired_status(None, &observed(&v, Some(rollout(2, 1, 2))), &at(2));
    let r = find(&s.conditions, RECONCILING).unwrap();
    assert!(r.message.contains("1/2 pods updated"), "{}", r.message);
}
