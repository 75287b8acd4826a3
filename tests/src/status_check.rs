//! `chatgate-status`: the kstatus library and Argo CD's Lua health-check runner in one
//! small Go tool (`hack/status-check`), built on first use by `hack/status-check.sh`
//! from the Go module proxy into the cache, like the Kubernetes binaries.

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::path::PathBuf;
use std::process::Command;

/// What a status reader concluded about one object.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Verdict {
    pub file: String,
    pub status: String,
    pub message: String,
}

/// Builds the tool when the cache lacks it (its progress goes to this process's
/// stderr) and returns its path.
pub fn ensure_status_check() -> Result<PathBuf> {
    let path = crate::bins::go_tool("status-check.sh")?;
    if !path.is_file() {
        bail!(
            "hack/status-check.sh printed `{}`, which is not a file",
            path.display()
        );
    }
    Ok(path)
}

/// Runs `chatgate-status ARGS... FILES...` and reads one verdict per file.
pub fn verdicts(args: &[&str], files: &[PathBuf]) -> Result<Vec<Verdict>> {
    let tool = ensure_status_check()?;
    let out = Command::new(&tool)
        .args(args)
        .args(files)
        .output()
        .with_context(|| format!("running {}", tool.display()))?;
    if !out.status.success() {
        bail!(
            "chatgate-status {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("reading `{l}`")))
        .collect()
}
