//! Records the git revision the binaries are built from, for `--version` and the
//! image labels: `CHATGATE_REVISION` when the builder sets it (a source tarball or a
//! container build without `.git`), else `git rev-parse HEAD`, else `unknown`.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-env-changed=CHATGATE_REVISION");
    let revision = match std::env::var("CHATGATE_REVISION") {
        Ok(r) if !r.trim().is_empty() => r.trim().to_owned(),
        _ => {
            // A new commit moves HEAD or the branch it names; either file changing
            // re-runs this script, so the revision is never stale.
            // Only files that exist: cargo treats a missing one as changed on
            // every build (packed-refs often does not exist).
            let branch = git(&["symbolic-ref", "-q", "HEAD"]);
            for path in ["HEAD", "packed-refs"].into_iter().chain(branch.as_deref()) {
                if let Some(p) = git(&["rev-parse", "--git-path", path])
                    && std::path::Path::new(&p).exists()
                {
                    println!("cargo:rerun-if-changed={}", absolute(p));
                }
            }
            git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".to_owned())
        }
    };
    println!("cargo:rustc-env=CHATGATE_REVISION={revision}");
}

/// `git rev-parse --git-path` answers relative to the current directory.
fn absolute(path: String) -> String {
    let p = PathBuf::from(&path);
    if p.is_absolute() {
        return path;
    }
    std::env::current_dir()
        .map(|d| d.join(p).display().to_string())
        .unwrap_or(path)
}
