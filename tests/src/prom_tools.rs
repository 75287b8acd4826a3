//! The monitoring tools, built on first use by `hack/prom-tools.sh` from the Go module
//! proxy into the cache, like the Kubernetes binaries: `promtool`, the `prometheus`
//! server (without its web UI's assets) and `chatgate-dashlint` (hack/prom-tools).

use anyhow::{Result, bail};
use std::path::PathBuf;

/// Every executable [`ensure_prom_tools`] provides.
pub const PROM_TOOLS: [&str; 3] = ["promtool", "prometheus", "chatgate-dashlint"];

/// Builds the tools when the cache lacks them (the build's progress goes to this
/// process's stderr) and returns the directory holding [`PROM_TOOLS`].
pub fn ensure_prom_tools() -> Result<PathBuf> {
    let dir = crate::bins::go_tool("prom-tools.sh")?;
    for tool in PROM_TOOLS {
        if !dir.join(tool).is_file() {
            bail!(
                "hack/prom-tools.sh printed `{}`, which holds no {tool}",
                dir.display()
            );
        }
    }
    Ok(dir)
}
