//! chatgate's container images as the tests use them: built once per test binary by
//! `hack/image.sh` (what `make image` runs), unpacked with umoci into a root
//! filesystem, and run from there the way a container runtime would — a fresh mount
//! namespace, the root filesystem read-only, a tmpfs or a Pod's volumes where the
//! Pod mounts them, `/proc` and a minimal `/dev`, then `chroot` and the image's
//! user. Nothing of the host's filesystem is visible to the process, so a library,
//! CA bundle or writable path the image lacks fails the test that runs it.
//!
//! Running a container needs root (mounts and chroot), as a kubelet does.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;
use tokio::sync::OnceCell;

use crate::process::ManagedProcess;

/// Where the images' references point: the registry path the chart and the examples
/// name.
pub const REPOSITORY: &str = "ghcr.io/chatgate";

/// The repository root, found relative to this crate so it works from any cwd.
pub fn workspace_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    root.canonicalize().unwrap_or(root)
}

/// One built image: an OCI layout directory and the same layout as a tar.
#[derive(Clone, Debug)]
pub struct Image {
    /// `chatgate-service` or `chatgate-operator`.
    pub name: String,
    /// The crate version, also the layout's tag.
    pub version: String,
    /// The manifest digest, `sha256:…`.
    pub digest: String,
    /// The OCI layout directory.
    pub layout: PathBuf,
    /// The OCI layout in a tar (what `docker load` reads).
    pub archive: PathBuf,
}

impl Image {
    /// `ghcr.io/chatgate/<name>:<version>`, the reference the chart and examples use.
    pub fn reference(&self) -> String {
        format!("{REPOSITORY}/{}:{}", self.name, self.version)
    }
}

/// The service image's reference as the build tags it (`…:<version>`).
pub fn service_reference() -> String {
    format!(
        "{REPOSITORY}/chatgate-service:{}",
        chatgate_contract::build_info::VERSION
    )
}

/// Both images, as one run of `hack/image.sh` built them.
#[derive(Clone, Debug)]
pub struct Images {
    pub service: Image,
    pub operator: Image,
    /// The directory holding umoci and crane.
    pub tools: PathBuf,
}

impl Images {
    /// Builds the images into `target/images` once per test binary (later calls
    /// return the same build).
    pub async fn shared() -> Result<&'static Images> {
        static SHARED: OnceCell<Result<Images, String>> = OnceCell::const_new();
        SHARED
            .get_or_init(|| async {
                let out = workspace_root().join("target/images");
                tokio::task::spawn_blocking(move || {
                    Images::build(&out, test_binaries()?.as_deref())
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| format!("{e:#}")))
            })
            .await
            .as_ref()
            .map_err(|e| anyhow!("building the images: {e}"))
    }

    /// Runs `hack/image.sh OUT` and reads the digests it prints: with `binaries`,
    /// it packs the binaries found there; without, it builds release ones.
    pub fn build(out: &Path, binaries: Option<&Path>) -> Result<Images> {
        let root = workspace_root();
        crate::progress(&format!(
            "building the images into {} (hack/image.sh, from {}; the first run also builds the image tools)",
            out.display(),
            binaries.map_or("a release build".to_owned(), |b| b.display().to_string()),
        ));
        let mut command = Command::new(root.join("hack/image.sh"));
        match binaries {
            Some(dir) => command.env("CHATGATE_IMAGE_FROM", dir),
            None => command.env_remove("CHATGATE_IMAGE_FROM"),
        };
        let output = command
            .arg(out)
            .current_dir(&root)
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("running hack/image.sh")?;
        if !output.status.success() {
            bail!("hack/image.sh {} failed ({})", out.display(), output.status);
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let image = |name: &str| -> Result<Image> {
            let line = stdout
                .lines()
                .find(|l| l.split_whitespace().next() == Some(name))
                .ok_or_else(|| anyhow!("hack/image.sh printed no line for {name}: {stdout}"))?;
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [_, version, digest, ..] = fields[..] else {
                bail!("unexpected line from hack/image.sh: {line}");
            };
            Ok(Image {
                name: name.to_owned(),
                version: version.to_owned(),
                digest: digest.to_owned(),
                layout: out.join(name),
                archive: out.join(format!("{name}.tar")),
            })
        };
        Ok(Images {
            service: image("chatgate-service")?,
            operator: image("chatgate-operator")?,
            tools: tools_dir()?,
        })
    }

    /// The image a Pod's `image` names, as a registry would resolve it: by the
    /// version tag, the revision tag, or the digest.
    pub fn resolve(&self, reference: &str) -> Option<&Image> {
        [&self.service, &self.operator].into_iter().find(|image| {
            let repo = format!("{REPOSITORY}/{}", image.name);
            reference == format!("{repo}:{}", image.version)
                || reference == format!("{repo}@{}", image.digest)
                || reference.strip_prefix(&format!("{repo}:")) == Some(REVISION)
        })
    }
}

/// Where the tests' images take their binaries from: the debug binaries `cargo
/// test --workspace` builds (built first, a no-op when it just did), so a test
/// run compiles the workspace once; `None` — a release build, as `make image`
/// does — when `CHATGATE_TEST_IMAGES=release`.
pub fn test_binaries() -> Result<Option<PathBuf>> {
    if std::env::var("CHATGATE_TEST_IMAGES").as_deref() == Ok("release") {
        return Ok(None);
    }
    let root = workspace_root();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        // `cargo test`'s own build (dev-dependencies' features included), so these
        // are the very binaries the test run built, not a second feature set.
        .args(["test", "--quiet", "--workspace", "--no-run"])
        .current_dir(&root)
        .status()
        .context("running cargo test --workspace --no-run for the images")?;
    if !status.success() {
        bail!("cargo test --workspace --no-run failed ({status})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(Some(target.join("debug")))
}

/// The git revision the test binary was built from, which `hack/image.sh` also
/// builds and tags.
pub const REVISION: &str = chatgate_contract::build_info::REVISION;

/// `hack/image-tools.sh`: builds umoci, crane and the registry if missing, and
/// returns their directory.
pub fn tools_dir() -> Result<PathBuf> {
    let output = Command::new(workspace_root().join("hack/image-tools.sh"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running hack/image-tools.sh")?;
    if !output.status.success() {
        bail!("hack/image-tools.sh failed ({})", output.status);
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim().to_owned(),
    ))
}

/// An unpacked image: its root filesystem and the runtime configuration umoci
/// derived from the image config (entrypoint, environment, user).
#[derive(Clone, Debug)]
pub struct Bundle {
    pub rootfs: PathBuf,
    pub process: BundleProcess,
}

/// The `process` of an OCI runtime `config.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct BundleProcess {
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub cwd: String,
    pub user: BundleUser,
}

#[derive(Clone, Debug, Deserialize)]
pub struct BundleUser {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Deserialize)]
struct RuntimeConfig {
    process: BundleProcess,
}

/// Unpacks `image` under `dir` (once per digest: a later call reuses the bundle, as
/// a node reuses a pulled image).
pub fn unpack(image: &Image, tools: &Path, dir: &Path) -> Result<Bundle> {
    static UNPACKING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = UNPACKING.lock().unwrap_or_else(|e| e.into_inner());
    let bundle = dir.join(image.digest.replace(':', "-"));
    if !bundle.join("config.json").is_file() {
        let _ = std::fs::remove_dir_all(&bundle);
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let output = Command::new(tools.join("umoci"))
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:{}", image.layout.display(), image.version))
            .arg(&bundle)
            .output()
            .context("running umoci unpack")?;
        if !output.status.success() {
            bail!(
                "umoci unpack {} failed: {}",
                image.layout.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    let text = std::fs::read_to_string(bundle.join("config.json"))
        .with_context(|| format!("reading {}/config.json", bundle.display()))?;
    let config: RuntimeConfig = serde_json::from_str(&text).context("parsing config.json")?;
    Ok(Bundle {
        rootfs: bundle.join("rootfs"),
        process: config.process,
    })
}

/// What is mounted at a path inside the container.
#[derive(Clone, Debug)]
pub enum MountSource {
    /// A host directory or file (an `emptyDir`, a projected token, the termination
    /// log), read-write or read-only.
    Bind { host: PathBuf, read_only: bool },
    /// A fresh tmpfs.
    Tmpfs,
}

#[derive(Clone, Debug)]
pub struct Mount {
    /// The absolute path inside the container.
    pub target: String,
    pub source: MountSource,
}

/// How to run one container from a [`Bundle`].
#[derive(Clone, Debug)]
pub struct ContainerSpec {
    /// The full argument vector (`entrypoint` + `cmd`, or a Pod's overrides).
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub uid: u32,
    pub gid: u32,
    pub read_only_root: bool,
    pub mounts: Vec<Mount>,
}

impl ContainerSpec {
    /// The image's own process: its entrypoint, environment and user, with a
    /// read-only root and a tmpfs at `/tmp`, as the operator's Pods run it.
    pub fn from_image(bundle: &Bundle) -> ContainerSpec {
        ContainerSpec {
            args: bundle.process.args.clone(),
            env: bundle
                .process
                .env
                .iter()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            uid: bundle.process.user.uid,
            gid: bundle.process.user.gid,
            read_only_root: true,
            mounts: vec![Mount {
                target: "/tmp".into(),
                source: MountSource::Tmpfs,
            }],
        }
    }

    /// Starts the container as a [`ManagedProcess`] (stopped with its test), its
    /// output in `log`. `scratch` is a per-container directory for the writable
    /// layer when the root is not read-only.
    pub fn spawn(
        &self,
        name: &str,
        bundle: &Bundle,
        scratch: &Path,
        log: &Path,
    ) -> Result<ManagedProcess> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!(
                "running a container needs root (mount namespaces and chroot), as a kubelet does; run the tests as root"
            );
        }
        let Some(program) = self.args.first() else {
            bail!(
                "container {name} has no command: the image has no entrypoint and the Pod names none"
            );
        };
        let setup = MountPlan::new(self, bundle, scratch)?;
        let mut command = Command::new(program);
        command.args(&self.args[1..]).env_clear().envs(&self.env);
        // SAFETY: the closure runs between fork and exec and only makes system calls
        // (unshare, mount, mkdir, mknod, chroot, chdir, setgroups, setgid, setuid)
        // on memory prepared before the fork.
        unsafe {
            command.pre_exec(move || setup.enter());
        }
        ManagedProcess::spawn(name, command, log)
    }
}

/// Every path and option the child needs, as C strings made before the fork.
struct MountPlan {
    root: CString,
    /// `(source, target inside root, read-only)` bind mounts.
    binds: Vec<(CString, CString, bool)>,
    tmpfs: Vec<CString>,
    /// Directories to create (inside the root, before its read-only remount) so the
    /// mount points exist; an image need not have them.
    mount_points: Vec<CString>,
    /// Files to create as mount points for file binds.
    file_points: Vec<CString>,
    overlay: CString,
    proc_dir: CString,
    dev_dir: CString,
    devices: Vec<(CString, u32, u32)>,
    read_only: bool,
    uid: u32,
    gid: u32,
}

impl MountPlan {
    fn new(spec: &ContainerSpec, bundle: &Bundle, scratch: &Path) -> Result<MountPlan> {
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).context("a path with a NUL byte");
        let root = scratch.join("root");
        std::fs::create_dir_all(&root)?;
        // The image's root is shared by every container of that image; each gets an
        // overlay whose upper layer is its own, so a writable root (or the mount
        // points made below) never changes the image.
        let upper = scratch.join("upper");
        let work = scratch.join("work");
        std::fs::create_dir_all(&upper)?;
        std::fs::create_dir_all(&work)?;
        let overlay = format!(
            "lowerdir={},upperdir={},workdir={}",
            bundle.rootfs.display(),
            upper.display(),
            work.display()
        );
        let inside = |target: &str| root.join(target.trim_start_matches('/'));
        let mut binds = Vec::new();
        let mut tmpfs = Vec::new();
        let mut mount_points = Vec::new();
        let mut file_points = Vec::new();
        for mount in &spec.mounts {
            if !mount.target.starts_with('/') || mount.target.contains("..") {
                bail!(
                    "mount target {} must be an absolute path without ..",
                    mount.target
                );
            }
            let target = inside(&mount.target);
            match &mount.source {
                MountSource::Tmpfs => {
                    mount_points.extend(
                        ancestors(&root, &target)
                            .iter()
                            .map(|p| c(p))
                            .collect::<Result<Vec<_>>>()?,
                    );
                    tmpfs.push(c(&target)?);
                }
                MountSource::Bind { host, read_only } => {
                    let parents = if host.is_dir() {
                        ancestors(&root, &target)
                    } else {
                        file_points.push(c(&target)?);
                        target
                            .parent()
                            .map(|p| ancestors(&root, p))
                            .unwrap_or_default()
                    };
                    mount_points.extend(parents.iter().map(|p| c(p)).collect::<Result<Vec<_>>>()?);
                    binds.push((c(host)?, c(&target)?, *read_only));
                }
            }
        }
        let dev = inside("/dev");
        let devices = [
            ("null", 1, 3),
            ("zero", 1, 5),
            ("random", 1, 8),
            ("urandom", 1, 9),
        ]
        .into_iter()
        .map(|(n, major, minor)| Ok((c(&dev.join(n))?, major, minor)))
        .collect::<Result<Vec<_>>>()?;
        Ok(MountPlan {
            root: c(&root)?,
            binds,
            tmpfs,
            mount_points,
            file_points,
            overlay: CString::new(overlay)?,
            proc_dir: c(&inside("/proc"))?,
            dev_dir: c(&dev)?,
            devices,
            read_only: spec.read_only_root,
            uid: spec.uid,
            gid: spec.gid,
        })
    }

    /// In the child: a private mount namespace, the container's mounts, then
    /// `chroot` and the container's user. Errors end the child before `exec`, and
    /// the parent sees the spawn fail with this error.
    fn enter(&self) -> std::io::Result<()> {
        use std::io::Error;
        let check = |r: libc::c_int| {
            if r == 0 {
                Ok(())
            } else {
                Err(Error::last_os_error())
            }
        };
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: every pointer is a NUL-terminated string owned by `self`, which
        // lives until exec; the calls are plain system calls.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                c"overlay".as_ptr(),
                self.root.as_ptr(),
                c"overlay".as_ptr(),
                0,
                self.overlay.as_ptr().cast(),
            ))?;
            // /proc and a minimal /dev first: volumes may sit below /dev (the
            // termination log), and their mount points are made in that tmpfs.
            for dir in [&self.proc_dir, &self.dev_dir] {
                mkdir(dir)?;
            }
            check(libc::mount(
                c"proc".as_ptr(),
                self.proc_dir.as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                c"tmpfs".as_ptr(),
                self.dev_dir.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NOEXEC,
                c"mode=755,size=64k".as_ptr().cast(),
            ))?;
            for (path, major, minor) in &self.devices {
                check(libc::mknod(
                    path.as_ptr(),
                    libc::S_IFCHR | 0o666,
                    libc::makedev(*major, *minor),
                ))?;
                check(libc::chmod(path.as_ptr(), 0o666))?;
            }
            for dir in &self.mount_points {
                mkdir(dir)?;
            }
            for file in &self.file_points {
                let fd = libc::open(
                    file.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o644,
                );
                if fd < 0 {
                    return Err(Error::last_os_error());
                }
                libc::close(fd);
            }
            for dir in &self.tmpfs {
                check(libc::mount(
                    c"tmpfs".as_ptr(),
                    dir.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    c"mode=1777,size=256m".as_ptr().cast(),
                ))?;
            }
            for (source, target, read_only) in &self.binds {
                check(libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    null,
                    libc::MS_BIND,
                    std::ptr::null(),
                ))?;
                if *read_only {
                    check(libc::mount(
                        null,
                        target.as_ptr(),
                        null,
                        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                        std::ptr::null(),
                    ))?;
                }
            }
            if self.read_only {
                // Only the root's own mount turns read-only; the mounts on top of
                // it (tmpfs, volumes) keep their modes.
                check(libc::mount(
                    null,
                    self.root.as_ptr(),
                    null,
                    libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                    std::ptr::null(),
                ))?;
            }
            check(libc::chroot(self.root.as_ptr()))?;
            check(libc::chdir(c"/".as_ptr()))?;
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setgid(self.gid))?;
            check(libc::setuid(self.uid))?;
        }
        Ok(())
    }
}

/// `mkdir`, where an existing directory is fine. Only for the child before exec.
unsafe fn mkdir(dir: &CString) -> std::io::Result<()> {
    // SAFETY: a NUL-terminated path; errno is read right after the call.
    unsafe {
        if libc::mkdir(dir.as_ptr(), 0o755) != 0 && *libc::__errno_location() != libc::EEXIST {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `path` and each of its ancestors below `root`, outermost first.
fn ancestors(root: &Path, path: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = path
        .ancestors()
        .take_while(|p| p.starts_with(root) && *p != root)
        .map(Path::to_path_buf)
        .collect();
    dirs.reverse();
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestors_lists_each_directory_below_the_root_outermost_first() {
        let got = ancestors(Path::new("/r"), Path::new("/r/var/run/secrets"));
        assert_eq!(
            got,
            vec![
                PathBuf::from("/r/var"),
                PathBuf::from("/r/var/run"),
                PathBuf::from("/r/var/run/secrets")
            ]
        );
    }
}
