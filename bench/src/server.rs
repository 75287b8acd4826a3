//! The servers under test: how each one is started on a free loopback port, how we
//! know it is ready (`GET /health/startup` = 200), and a guard that kills it when
//! the benchmark ends — normally, on error, or on Ctrl-C.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

/// Longest a server may take to answer `/health/startup` with 200.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between readiness probes; small next to the 50 ms cold-start target.
const PROBE_INTERVAL: Duration = Duration::from_millis(1);
/// Longest a single readiness probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How to start one server under test.
#[derive(Debug, Clone)]
pub struct TargetSpec {
    /// Column name in the report.
    pub name: String,
    pub program: PathBuf,
    /// Arguments; `{addr}` and `{port}` are replaced with the chosen listen address.
    pub args: Vec<String>,
    /// Environment; values are substituted like `args`. Inherited `CHATGATE_*`
    /// variables are removed first, so only these configure the server.
    pub env: Vec<(String, String)>,
    /// The server sends a `{"type":"connected"}` frame after the upgrade; a
    /// connection counts only once it arrived.
    pub greets: bool,
}

/// A running server. Dropping it kills the process.
pub struct Server {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    /// Working directory (and stderr log) of the process, removed on drop.
    dir: PathBuf,
}

impl Server {
    /// Starts `spec` on a free loopback port and waits until `/health/startup` is 200.
    /// Returns the server and the time from spawn to the first 200 (cold start).
    pub async fn start(spec: &TargetSpec) -> Result<(Server, Duration)> {
        let addr = free_loopback_addr()?;
        let dir = std::env::temp_dir().join(format!(
            "chatgate-bench-{}-{}-{}",
            std::process::id(),
            spec.name,
            addr.port()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let stderr = std::fs::File::create(dir.join("stderr.log"))?;
        let fill = |s: &str| {
            s.replace("{addr}", &addr.to_string())
                .replace("{port}", &addr.port().to_string())
                .replace("{dir}", &dir.display().to_string())
        };

        // The server runs in its own directory, so a relative program path would
        // resolve against that; resolve it here.
        let program = std::path::absolute(&spec.program)?;
        let mut command = Command::new(&program);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CHATGATE_") {
                command.env_remove(key);
            }
        }
        command
            .args(spec.args.iter().map(|a| fill(a)))
            .envs(spec.env.iter().map(|(k, v)| (k, fill(v))))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of
        // the parent; it makes the server die with the benchmark even on SIGKILL.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }

        let started = Instant::now();
        let child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e).context(format!("starting {} ({})", spec.name, program.display()));
            }
        };
        let pid = child.id().unwrap_or_default();
        let mut server = Server {
            child,
            pid,
            addr,
            dir,
        };
        server.wait_ready(started).await?;
        Ok((server, started.elapsed()))
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    async fn wait_ready(&mut self, started: Instant) -> Result<()> {
        while started.elapsed() < STARTUP_TIMEOUT {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "exited before it was ready ({status}); stderr: {}",
                    self.stderr_tail()
                );
            }
            let probe = chatgate_tests::http::get(self.addr, "/health/startup");
            if let Ok(Ok((200, _))) = tokio::time::timeout(PROBE_TIMEOUT, probe).await {
                return Ok(());
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
        bail!(
            "/health/startup not 200 within {STARTUP_TIMEOUT:?}; stderr: {}",
            self.stderr_tail()
        )
    }

    fn stderr_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// Kills the process and waits for it to be gone, so the next start measures a
    /// machine without it.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback address whose port was free a moment ago.
fn free_loopback_addr() -> Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?)
}
