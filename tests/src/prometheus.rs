//! A real Prometheus server for the tests, on loopback. It runs the scrape jobs and the
//! alert rules the chart ships (`charts/chatgate-operator/files/`): the chat pods are
//! discovered through the test control plane, as in a cluster, and their Pod IP is
//! rewritten to its loopback twin (see [`crate::pod_network`]); the operators under
//! test run in the test process, so their `/metrics` addresses are handed over in a
//! file (`file_sd`) instead. [`AlertLog`] polls the alerts API and keeps every state
//! change, which is the timeline the rollout proof reports.

use crate::process::{ManagedProcess, free_loopback_ports};
use anyhow::{Context, Result, bail};
use serde_json::Value;
use serde_norway::Value as Yaml;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Where the chart keeps the monitoring files (one definition for chart and plain setups).
pub fn chart_files() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/chatgate-operator/files")
}

/// The rewrite from a Pod IP `10.N.a.b:port` to its loopback twin `127.N.a.b:port`.
const LOOPBACK_TWIN: &str = r#"
source_labels: [__address__]
regex: '10\.(\d+)\.(\d+)\.(\d+):(\d+)'
replacement: '127.$1.$2.$3:$4'
target_label: __address__
"#;

/// How the server is set up.
pub struct PrometheusOptions {
    /// Kubeconfig of the control plane whose pods are discovered.
    pub kubeconfig: PathBuf,
    /// Scrape and rule evaluation interval (short in tests; the rules' `for` windows
    /// and rate ranges stay as shipped).
    pub interval: Duration,
}

/// A running Prometheus; stopped when dropped.
pub struct Prometheus {
    process: ManagedProcess,
    address: SocketAddr,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

/// The configuration: the chart's scrape jobs, pointed at the test control plane and
/// at the operators' file of targets.
pub fn config(options: &PrometheusOptions, operator_targets: &Path) -> Result<String> {
    let plain = chart_files().join("scrape-config.yaml");
    let text =
        std::fs::read_to_string(&plain).with_context(|| format!("reading {}", plain.display()))?;
    let shipped: Yaml = serde_norway::from_str(&text).context("parsing scrape-config.yaml")?;
    let twin: Yaml = serde_norway::from_str(LOOPBACK_TWIN)?;
    let mut jobs = Vec::new();
    for job in shipped["scrape_configs"]
        .as_sequence()
        .context("scrape-config.yaml has no scrape_configs")?
    {
        let mut job = job.clone();
        let name = job["job_name"].as_str().unwrap_or_default().to_owned();
        let Some(map) = job.as_mapping_mut() else {
            continue;
        };
        if name == "chatgate-operator" {
            // In the test process, not in a pod: same job, labels and honor_labels.
            map.remove("kubernetes_sd_configs");
            map.remove("relabel_configs");
            map.insert(
                "file_sd_configs".into(),
                serde_norway::from_str(&format!(
                    "[{{files: ['{}'], refresh_interval: 1s}}]",
                    operator_targets.display()
                ))?,
            );
        } else {
            for sd in map
                .get_mut("kubernetes_sd_configs")
                .and_then(Yaml::as_sequence_mut)
                .into_iter()
                .flatten()
            {
                if let Some(sd) = sd.as_mapping_mut() {
                    sd.insert(
                        "kubeconfig_file".into(),
                        options.kubeconfig.display().to_string().into(),
                    );
                }
            }
            if let Some(relabel) = map
                .get_mut("relabel_configs")
                .and_then(Yaml::as_sequence_mut)
            {
                relabel.push(twin.clone());
            }
        }
        jobs.push(job);
    }
    let interval = format!("{}ms", options.interval.as_millis().max(100));
    let config = serde_json::json!({
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "evaluation_interval": interval,
        },
        "rule_files": [chart_files().join("alerts.yaml").display().to_string()],
        "scrape_configs": jobs,
    });
    Ok(serde_norway::to_string(&config)?)
}

impl Prometheus {
    /// Starts the server from `bin_dir` (see [`crate::prom_tools::ensure_prom_tools`])
    /// and waits until it is ready.
    pub async fn start(bin_dir: &Path, options: PrometheusOptions) -> Result<Prometheus> {
        let dir = tempfile::tempdir()?;
        let targets = dir.path().join("operators.json");
        std::fs::write(&targets, "[]")?;
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config(&options, &targets)?)?;
        let port = free_loopback_ports(1)?[0];
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let mut command = Command::new(bin_dir.join("prometheus"));
        command
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .arg("--storage.tsdb.retention.time=1d");
        let process =
            ManagedProcess::spawn("prometheus", command, &dir.path().join("prometheus.log"))?;
        let prometheus = Prometheus {
            process,
            address,
            dir,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = prometheus
                .http
                .get(format!("http://{address}/-/ready"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(prometheus);
            }
            if Instant::now() > deadline {
                bail!(
                    "prometheus was not ready within 60 s; its log:\n{}",
                    prometheus.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The end of the server's own log (for failure messages).
    pub fn log(&self) -> String {
        self.process.log_tail(40)
    }

    /// The operators' `/metrics` addresses to scrape (replaces the previous list).
    pub fn set_operator_targets(&self, targets: &[SocketAddr]) -> Result<()> {
        let list: Vec<String> = targets.iter().map(ToString::to_string).collect();
        let body = serde_json::json!([{ "targets": list, "labels": {} }]);
        // Written whole and renamed, so Prometheus never reads half a file.
        let tmp = self.dir.path().join("operators.json.tmp");
        std::fs::write(&tmp, body.to_string())?;
        std::fs::rename(&tmp, self.dir.path().join("operators.json"))?;
        Ok(())
    }

    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Result<Value> {
        let url = format!("http://{}{path}", self.address);
        let body: Value = self
            .http
            .get(&url)
            .query(query)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?
            .json()
            .await
            .with_context(|| format!("GET {url}: not JSON"))?;
        if body["status"] != "success" {
            bail!("GET {url} {query:?}: {body}");
        }
        Ok(body["data"].clone())
    }

    /// An instant query: each series' labels and value.
    pub async fn query(&self, expr: &str) -> Result<Vec<(BTreeMap<String, String>, f64)>> {
        let data = self.api("/api/v1/query", &[("query", expr)]).await?;
        Ok(data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|series| {
                let labels = labels(&series["metric"]);
                let value = series["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN);
                (labels, value)
            })
            .collect())
    }

    /// The active targets and their health (`up`, `down`, `unknown`).
    pub async fn targets(&self) -> Result<Vec<(BTreeMap<String, String>, String)>> {
        let data = self.api("/api/v1/targets", &[("state", "active")]).await?;
        Ok(data["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                (
                    labels(&t["labels"]),
                    t["health"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect())
    }

    /// The alerts pending or firing now.
    pub async fn alerts(&self) -> Result<Vec<Alert>> {
        let data = self.api("/api/v1/alerts", &[]).await?;
        Ok(data["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| Alert {
                labels: labels(&a["labels"]),
                state: a["state"].as_str().unwrap_or("").to_owned(),
                summary: a["annotations"]["summary"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
            })
            .collect())
    }
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
        .collect()
}

/// One alert as the API shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Alert {
    pub labels: BTreeMap<String, String>,
    /// `pending` (its `for` window is running) or `firing`.
    pub state: String,
    pub summary: String,
}

impl Alert {
    pub fn name(&self) -> &str {
        self.labels.get("alertname").map_or("", String::as_str)
    }
}

/// An alert's state change, seen by polling.
#[derive(Clone, Debug)]
pub struct AlertChange {
    pub at: SystemTime,
    pub alert: String,
    pub namespace: String,
    /// `pending`, `firing` or `inactive` (gone from the API).
    pub state: String,
    pub summary: String,
}

/// Polls the alerts API every `every` and records each change, until dropped.
pub struct AlertLog {
    changes: Arc<Mutex<Vec<AlertChange>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AlertLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AlertLog {
    pub fn start(prometheus: Arc<Prometheus>, every: Duration) -> AlertLog {
        let changes = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let changes = changes.clone();
            async move {
                let mut last: BTreeMap<(String, String), (String, String)> = BTreeMap::new();
                loop {
                    if let Ok(alerts) = prometheus.alerts().await {
                        let now = SystemTime::now();
                        let mut current = BTreeMap::new();
                        for a in alerts {
                            let key = (
                                a.name().to_owned(),
                                a.labels.get("namespace").cloned().unwrap_or_default(),
                            );
                            // Several series of one alert in one namespace: firing wins.
                            let entry = current
                                .entry(key)
                                .or_insert((a.state.clone(), a.summary.clone()));
                            if a.state == "firing" {
                                *entry = (a.state.clone(), a.summary.clone());
                            }
                        }
                        let mut log = changes.lock().unwrap_or_else(|e| e.into_inner());
                        for (key, (state, summary)) in &current {
                            if last.get(key).map(|(s, _)| s) != Some(state) {
                                log.push(AlertChange {
                                    at: now,
                                    alert: key.0.clone(),
                                    namespace: key.1.clone(),
                                    state: state.clone(),
                                    summary: summary.clone(),
                                });
                            }
                        }
                        for (key, (_, summary)) in &last {
                            if !current.contains_key(key) {
                                log.push(AlertChange {
                                    at: now,
                                    alert: key.0.clone(),
                                    namespace: key.1.clone(),
                                    state: "inactive".into(),
                                    summary: summary.clone(),
                                });
                            }
                        }
                        last = current;
                    }
                    tokio::time::sleep(every).await;
                }
            }
        });
        AlertLog { changes, task }
    }

    /// Every change recorded so far in `namespace`.
    pub fn changes_in(&self, namespace: &str) -> Vec<AlertChange> {
        self.changes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|c| c.namespace == namespace)
            .cloned()
            .collect()
    }
}
