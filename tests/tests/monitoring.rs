//! The monitoring files of the chart: the alerting rules pass `promtool check rules`
//! and their unit tests (`promtool test rules`), the plain scrape configuration passes
//! `promtool check config`, the Grafana dashboard passes the linter and every query in
//! it parses with Prometheus's own parser, and the chart renders the same rules as a
//! PrometheusRule, the PodMonitor, ServiceMonitor and dashboard ConfigMap only when
//! asked. Each check is also shown to fail on a broken input.

use chatgate_tests::process::{run_ok, run_to_end};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::Value;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/chatgate-operator");

fn files(name: &str) -> PathBuf {
    Path::new(CHART).join("files").join(name)
}

fn tool(name: &str) -> PathBuf {
    chatgate_tests::prom_tools::ensure_prom_tools()
        .expect("building the monitoring tools (hack/prom-tools.sh)")
        .join(name)
}

fn promtool(args: &[&str]) -> Command {
    let mut cmd = Command::new(tool("promtool"));
    cmd.args(args);
    cmd
}

/// A copy of files/ in a temporary directory, with `edit` applied to one file.
fn broken_copy(file: &str, edit: impl Fn(&str) -> String) -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    for name in [
        "alerts.yaml",
        "alerts_test.yaml",
        "dashboard.json",
        "scrape-config.yaml",
    ] {
        let text = std::fs::read_to_string(files(name))?;
        let text = if name == file {
            let edited = edit(&text);
            assert_ne!(edited, text, "the edit of {file} changed nothing");
            edited
        } else {
            text
        };
        std::fs::write(dir.path().join(name), text)?;
    }
    Ok(dir)
}

#[test]
fn alert_rules_check_and_pass_their_unit_tests() -> Result<()> {
    let alerts = files("alerts.yaml");
    let out = run_ok(promtool(&["check", "rules", alerts.to_str().unwrap()]));
    assert!(out.contains("SUCCESS"), "{out}");
    let out = run_ok(promtool(&[
        "test",
        "rules",
        files("alerts_test.yaml").to_str().unwrap(),
    ]));
    assert!(out.contains("SUCCESS"), "{out}");
    // The plain scrape configuration, with the rule file it names.
    run_ok(promtool(&[
        "check",
        "config",
        files("scrape-config.yaml").to_str().unwrap(),
    ]));

    // Every rule has a unit test: each alert name is tested by name.
    let tests = std::fs::read_to_string(files("alerts_test.yaml"))?;
    for name in alert_names(&std::fs::read_to_string(&alerts)?)? {
        assert!(
            tests.contains(&format!("alertname: {name}\n")),
            "alerts_test.yaml has no test of {name}"
        );
    }

    // A broken expression fails the check.
    let dir = broken_copy("alerts.yaml", |t| {
        t.replacen(
            "sum by (namespace) (chatgate_operator_leader)",
            "sum by (namespace) (chatgate_operator_leader",
            1,
        )
    })?;
    let (ok, out) = run_to_end(promtool(&[
        "check",
        "rules",
        dir.path().join("alerts.yaml").to_str().unwrap(),
    ]));
    assert!(
        !ok,
        "promtool check rules passed a broken expression:\n{out}"
    );

    // Each rule broken on purpose fails its unit tests: counting 503 as a server
    // error, a 50 % threshold, counting client errors as failed connections, staging
    // failures left out, a slow startup alerting for an hour after it finished, a
    // 30 s threshold, two operator replicas doubling the Stalled series, a Stalled
    // ChatService alerting as not progressing too, one install's leader hiding
    // another's absence.
    for (from, to) in [
        (r#"code=~"5..", code!="503""#, r#"code=~"5..""#),
        (") > 0.01\n        for: 5m", ") > 0.5\n        for: 5m"),
        (r#"code!~"101|400|401|403""#, r#"code!~"101""#),
        (
            r#"environment=~"staging|production"}[10m]"#,
            r#"environment=~"production"}[10m]"#,
        ),
        (
            "changes(chatgate_startup_complete[15m]) > 0",
            "changes(chatgate_startup_complete[1h]) > 0",
        ),
        (
            "(chatgate_startup_duration_seconds > 60)",
            "(chatgate_startup_duration_seconds > 30)",
        ),
        (
            r#"max by (namespace, chatservice, environment) (chatgate_operator_chatservice_condition{condition="Stalled"}) == 1"#,
            r#"sum by (namespace, chatservice, environment) (chatgate_operator_chatservice_condition{condition="Stalled"}) == 1"#,
        ),
        (
            "          unless on (namespace, chatservice)\n",
            "          or on (namespace, chatservice)\n",
        ),
        (
            "sum by (namespace) (chatgate_operator_leader) < 1",
            "sum(chatgate_operator_leader) < 1",
        ),
    ] {
        let dir = broken_copy("alerts.yaml", |t| t.replacen(from, to, 1))?;
        let (ok, out) = run_to_end(promtool(&[
            "test",
            "rules",
            dir.path().join("alerts_test.yaml").to_str().unwrap(),
        ]));
        assert!(
            !ok,
            "promtool test rules passed with `{from}` changed to `{to}`:\n{out}"
        );
    }
    Ok(())
}

fn alert_names(rules: &str) -> Result<Vec<String>> {
    let v: Value = serde_norway::from_str(rules)?;
    Ok(v["groups"]
        .as_array()
        .context("no groups")?
        .iter()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect())
}

/// Every PromQL expression of a dashboard: the panels' queries and the query
/// variables' selectors (inside `label_values(SELECTOR, label)`), by where they are.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?");
            for t in p["targets"].as_array().into_iter().flatten() {
                let r = t["refId"].as_str().unwrap_or("?");
                if let Some(expr) = t["expr"].as_str() {
                    out.push((format!("panel {title:?} query {r}"), expr.to_owned()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"].as_str().unwrap_or_default();
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .and_then(|s| s.rsplit_once(','))
            .map(|(selector, _label)| selector.trim().to_owned())
            .unwrap_or_else(|| q.to_owned());
        out.push((format!("variable {}", v["name"]), inner));
    }
    out
}

/// Grafana's variables replaced by values Prometheus accepts.
fn substitute(expr: &str) -> String {
    let mut s = expr
        .replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "6h");
    for var in ["namespace", "chatservice", "environment"] {
        s = s
            .replace(&format!("${{{var}}}"), "x")
            .replace(&format!("${var}"), "x");
    }
    s
}

/// The expressions promtool's parser rejects, with its message.
fn unparsable(queries: &[(String, String)]) -> Vec<String> {
    queries
        .iter()
        .filter_map(|(where_, expr)| {
            let expr = substitute(expr);
            let (ok, out) = run_to_end(promtool(&["--experimental", "promql", "format", &expr]));
            (!ok).then(|| format!("{where_}: `{expr}`: {out}"))
        })
        .collect()
}

#[test]
fn the_dashboard_lints_and_every_query_parses() -> Result<()> {
    let path = files("dashboard.json");
    let out = run_ok({
        let mut c = Command::new(tool("chatgate-dashlint"));
        c.arg(&path);
        c
    });
    assert!(out.contains("no findings"), "{out}");

    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 20, "only {} queries found", queries.len());
    let bad = unparsable(&queries);
    assert!(
        bad.is_empty(),
        "queries that do not parse:\n{}",
        bad.join("\n")
    );
    // Every metric the alerts use is on the dashboard too.
    let all: String = queries.iter().map(|(_, q)| q.as_str()).collect();
    for metric in [
        "chatgate_ws_upgrades_total",
        "chatgate_startup_complete",
        "chatgate_startup_duration_seconds",
        "chatgate_operator_startup_failures_total",
        "chatgate_operator_chatservice_condition",
        "chatgate_operator_leader",
    ] {
        assert!(all.contains(metric), "the dashboard never shows {metric}");
    }

    // The parse check and the linter fail on broken input.
    let broken = vec![(
        "broken".to_owned(),
        "sum by (code) (rate(chatgate_ws_upgrades_total{namespace=~\"$namespace\"}[$__rate_interval])"
            .to_owned(),
    )];
    assert_eq!(unparsable(&broken).len(), 1, "an unbalanced query parsed");
    let edits: [fn(&str) -> String; 4] = [
        // A field Grafana's schema does not have.
        |t: &str| t.replacen("\"legendFormat\"", "\"legendFromat\"", 1),
        // A fixed range instead of $__rate_interval.
        |t: &str| t.replacen("[$__rate_interval]", "[5m]", 1),
        // A panel whose datasource is not the template variable.
        |t: &str| t.replacen("\"uid\": \"${datasource}\"", "\"uid\": \"prometheus\"", 1),
        // A variable the dashboard does not define.
        |t: &str| t.replacen("$chatservice", "$chat_service", 1),
    ];
    for edit in edits {
        let dir = broken_copy("dashboard.json", edit)?;
        let mut c = Command::new(tool("chatgate-dashlint"));
        c.arg(dir.path().join("dashboard.json"));
        let (ok, out) = run_to_end(c);
        assert!(!ok, "the linter passed a broken dashboard:\n{out}");
    }
    Ok(())
}

fn helm(args: &[&str]) -> Command {
    let bin = chatgate_tests::bins::ensure_binaries().expect("building helm (hack/k8s-bins.sh)");
    let home = std::env::temp_dir().join("chatgate-monitoring-helm");
    let mut cmd = Command::new(bin.join("helm"));
    cmd.args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    cmd
}

const PROMETHEUS_OPERATOR: &str = "--api-versions=monitoring.coreos.com/v1/PrometheusRule";

fn render(extra: &[&str]) -> Vec<Value> {
    let mut args = vec![
        "template",
        "chatgate",
        CHART,
        "--namespace",
        "chatgate-system",
    ];
    args.extend_from_slice(extra);
    let out = run_ok(helm(&args));
    serde_norway::Deserializer::from_str(&out)
        .filter_map(|doc| Value::deserialize(doc).ok())
        .filter(|v| !v.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

const MONITORING_KINDS: [&str; 3] = ["PrometheusRule", "PodMonitor", "ServiceMonitor"];

fn is_dashboard(d: &&Value) -> bool {
    d["kind"] == "ConfigMap" && d["metadata"]["labels"]["grafana_dashboard"].is_string()
}

#[test]
fn the_chart_renders_monitoring_only_when_asked() -> Result<()> {
    run_ok(helm(&["lint", "--strict", CHART]));
    run_ok(helm(&[
        "lint",
        "--strict",
        CHART,
        "--set",
        "monitoring.prometheusRule.enabled=true,monitoring.podMonitor.enabled=true,monitoring.serviceMonitor.enabled=true,monitoring.dashboard.enabled=true",
    ]));

    // By default nothing: no Prometheus Operator in the cluster, nothing switched on.
    let docs = render(&[]);
    for kind in MONITORING_KINDS {
        assert!(
            of_kind(&docs, kind).is_empty(),
            "{kind} rendered by default"
        );
    }
    assert!(
        !docs.iter().any(|d| is_dashboard(&d)),
        "dashboard rendered by default"
    );
    assert!(!of_kind(&docs, "Deployment").is_empty());

    // With the Prometheus Operator present: the PrometheusRule only, holding exactly
    // the groups of the plain rule file.
    let docs = render(&[PROMETHEUS_OPERATOR]);
    let rules = of_kind(&docs, "PrometheusRule");
    assert_eq!(rules.len(), 1);
    let plain: Value = serde_norway::from_str(&std::fs::read_to_string(files("alerts.yaml"))?)?;
    assert_eq!(
        rules[0]["spec"]["groups"], plain["groups"],
        "the PrometheusRule differs from files/alerts.yaml"
    );
    assert!(plain["groups"].as_array().is_some_and(|g| !g.is_empty()));
    for kind in ["PodMonitor", "ServiceMonitor"] {
        assert!(
            of_kind(&docs, kind).is_empty(),
            "{kind} rendered without being enabled"
        );
    }
    assert!(!docs.iter().any(|d| is_dashboard(&d)));

    // Switched off explicitly: not even with the Prometheus Operator present.
    let docs = render(&[
        PROMETHEUS_OPERATOR,
        "--set",
        "monitoring.prometheusRule.enabled=false",
    ]);
    assert!(of_kind(&docs, "PrometheusRule").is_empty());

    // Everything on.
    let docs = render(&[
        "--set",
        "monitoring.prometheusRule.enabled=true,monitoring.podMonitor.enabled=true,monitoring.serviceMonitor.enabled=true,monitoring.dashboard.enabled=true,monitoring.dashboard.label=dashboards,monitoring.dashboard.labelValue=chatgate",
    ]);
    assert_eq!(of_kind(&docs, "PrometheusRule").len(), 1);

    let pm = of_kind(&docs, "PodMonitor");
    assert_eq!(pm.len(), 1);
    let pm = pm[0];
    assert_eq!(
        pm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        "chatgate"
    );
    assert_eq!(
        pm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"],
        "chat"
    );
    assert_eq!(pm["spec"]["namespaceSelector"]["any"], true);
    let endpoint = &pm["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["port"], "http");
    // The same relabelling as the plain scrape configuration's chat job.
    let scrape: Value =
        serde_norway::from_str(&std::fs::read_to_string(files("scrape-config.yaml"))?)?;
    let plain_relabels = &scrape["scrape_configs"][0]["relabel_configs"];
    for r in endpoint["relabelings"]
        .as_array()
        .context("no relabelings")?
    {
        let target = &r["targetLabel"];
        assert!(
            plain_relabels
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["target_label"] == *target && p["source_labels"] == r["sourceLabels"]),
            "the scrape configuration sets {target} otherwise than the PodMonitor"
        );
    }
    let targets: Vec<&Value> = endpoint["relabelings"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| &r["targetLabel"])
        .collect();
    assert!(
        targets.contains(&&Value::from("chatservice"))
            && targets.contains(&&Value::from("environment"))
    );
    assert_eq!(scrape["scrape_configs"][1]["honor_labels"], true);

    let sm = of_kind(&docs, "ServiceMonitor");
    assert_eq!(sm.len(), 1);
    assert_eq!(sm[0]["spec"]["endpoints"][0]["honorLabels"], true);
    assert_eq!(sm[0]["spec"]["endpoints"][0]["port"], "http");
    let service = of_kind(&docs, "Service");
    assert_eq!(
        sm[0]["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        service[0]["metadata"]["labels"]["app.kubernetes.io/name"],
        "the ServiceMonitor selects the operator's metrics Service"
    );

    let cm: Vec<&Value> = of_kind(&docs, "ConfigMap")
        .into_iter()
        .filter(|d| d["metadata"]["labels"]["dashboards"] == "chatgate")
        .collect();
    assert_eq!(
        cm.len(),
        1,
        "the dashboard ConfigMap with the configured label"
    );
    let shipped: Value = serde_json::from_str(&std::fs::read_to_string(files("dashboard.json"))?)?;
    let rendered: Value = serde_json::from_str(
        cm[0]["data"]["chatgate.json"]
            .as_str()
            .context("no chatgate.json")?,
    )?;
    assert_eq!(
        rendered, shipped,
        "the ConfigMap holds files/dashboard.json"
    );

    // A watchNamespace install looks for chat pods in those namespaces only.
    let docs = render(&[
        "--set",
        "monitoring.podMonitor.enabled=true,watchNamespace=team-a\\,team-b",
    ]);
    assert_eq!(
        of_kind(&docs, "PodMonitor")[0]["spec"]["namespaceSelector"]["matchNames"],
        serde_json::json!(["team-a", "team-b"])
    );

    // The schema refuses a mistyped value.
    let (ok, out) = run_to_end(helm(&[
        "template",
        "chatgate",
        CHART,
        "--set",
        "monitoring.prometheusRule.enabled=sometimes",
    ]));
    assert!(!ok, "an invalid monitoring value rendered:\n{out}");
    Ok(())
}
