//! `chatgate-status`: the kstatus library and Argo CD's Lua health-check runner in one
//! small Go tool (`hack/status-check`), built on first use by `hack/status-check.sh`
//! from the Go module proxy into the cache, like the Kubernetes binaries.

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What a status reader concluded about one object.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Verdict {
    pub file: String,
    pub status: String,
    pub message: String,
}

fn script() -> PathBuf {
    let in_repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/status-check.sh");
    in_repo.canonicalize().unwrap_or(in_repo)
}

/// Builds the tool when the cache lacks it (its progress goes to this process's
/// stderr) and returns its path.
pub fn ensure_status_check() -> Result<PathBuf> {
    let script = script();
    let out = Command::new("bash")
        .arg(&script)
        .env("CHATGATE_CACHE", crate::bins::cache_root())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}); run it by hand to see why (it needs `go` and the Go module proxy)",
            script.display(),
            out.status
        );
    }
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !path.is_file() {
        bail!(
            "{} printed `{}`, which is not a file",
            script.display(),
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
