//! Where the Kubernetes binaries live, and building them on first use.
//!
//! The binaries are built from the Go module proxy by `hack/k8s-bins.sh` into a
//! per-version cache outside the repository. The harness runs that script itself
//! when something is missing, so `cargo test` works on a fresh machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// The Kubernetes release the binaries are built from. It must stay equal to the
/// minor of the `k8s-openapi` feature the workspace enables (`v1_35`).
pub const K8S_VERSION: &str = "1.35.4";

/// Every executable the control plane, `kubectl` users and chart tests need.
pub const BINARIES: [&str; 7] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "helm",
];

/// kwok's lifecycle stages, copied by the build script from kwok's module.
pub const KWOK_STAGES: [&str; 5] = [
    "node-initialize.yaml",
    "node-heartbeat-with-lease.yaml",
    "pod-ready.yaml",
    "pod-complete.yaml",
    "pod-delete.yaml",
];

/// The cache root shared with `hack/k8s-bins.sh`: `$CHATGATE_CACHE`, else
/// `$XDG_CACHE_HOME/chatgate`, else `~/.cache/chatgate`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = non_empty_env("CHATGATE_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = non_empty_env("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("chatgate");
    }
    let home = non_empty_env("HOME").unwrap_or_else(|| "/tmp".to_owned());
    PathBuf::from(home).join(".cache").join("chatgate")
}

/// `<cache root>/k8s-<version>`: binaries, kwok stages and the Go wrapper module.
pub fn version_dir() -> PathBuf {
    cache_root().join(format!("k8s-{K8S_VERSION}"))
}

/// The directory holding [`BINARIES`].
pub fn bin_dir() -> PathBuf {
    version_dir().join("bin")
}

/// The directory holding [`KWOK_STAGES`].
pub fn kwok_stages_dir() -> PathBuf {
    version_dir().join("kwok-stages")
}

/// The build script, found relative to this crate so it works from any cwd.
pub fn build_script() -> PathBuf {
    let in_repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/k8s-bins.sh");
    in_repo.canonicalize().unwrap_or(in_repo)
}

/// What is missing from the cache, by file name; empty when everything is there.
pub fn missing() -> Vec<String> {
    let bins = BINARIES
        .iter()
        .filter(|b| !is_executable(&bin_dir().join(b)))
        .map(|b| (*b).to_owned());
    let stages = KWOK_STAGES
        .iter()
        .filter(|s| !kwok_stages_dir().join(s).is_file())
        .map(|s| format!("kwok-stages/{s}"));
    bins.chain(stages).collect()
}

/// Returns the bin directory, first running `hack/k8s-bins.sh` when anything is
/// missing. The script prints its progress straight to this process's stderr (not
/// through the test harness's capture), because a cold build takes many minutes.
pub fn ensure_binaries() -> Result<PathBuf> {
    let missing = missing();
    if missing.is_empty() {
        return Ok(bin_dir());
    }
    let script = build_script();
    crate::progress(&format!(
        "Kubernetes v{K8S_VERSION} binaries missing ({}); building them with {} \
         (first run on this machine only; takes several minutes)",
        missing.join(", "),
        script.display()
    ));
    let status = Command::new("bash")
        .arg(&script)
        .env("K8S_VERSION", K8S_VERSION)
        .env("CHATGATE_CACHE", cache_root())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!(
            "{} failed ({status}); run it by hand to see why (it needs `go` and the Go module proxy)",
            script.display()
        );
    }
    let still_missing = self::missing();
    if !still_missing.is_empty() {
        bail!(
            "{} finished but {} still lack(s) in {}",
            script.display(),
            still_missing.join(", "),
            version_dir().display()
        );
    }
    Ok(bin_dir())
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Runs `hack/<script>`, which builds a Go tool into the cache when it is missing
/// (the build's progress goes to this process's stderr) and prints where it is.
pub fn go_tool(script: &str) -> Result<PathBuf> {
    let in_repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../hack")
        .join(script);
    let script = in_repo.canonicalize().unwrap_or(in_repo);
    let out = Command::new("bash")
        .arg(&script)
        .env("CHATGATE_CACHE", cache_root())
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
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}
