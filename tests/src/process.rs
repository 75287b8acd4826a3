//! Starting and stopping the control plane's processes so that none outlives the
//! program that started it: not when a test fails, not when the run is
//! interrupted, not when the test binary is killed.
//!
//! Three layers do that. A [`ManagedProcess`] kills its process group when dropped.
//! Every child gets `PR_SET_PDEATHSIG(SIGKILL)`, so the kernel kills it when its
//! parent dies by a signal and no destructor runs. And because the kernel ties
//! that signal to the parent *thread*, not the process, every child is spawned
//! from one dedicated thread that lives as long as the program (a test thread
//! that spawned it would end with its test and take the control plane with it).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

type Job = Box<dyn FnOnce() + Send>;

/// Runs `job` on the spawner thread and returns its result.
fn on_spawner_thread<T: Send + 'static>(job: impl FnOnce() -> T + Send + 'static) -> T {
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("chatgate-spawner".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .expect("starting the process spawner thread");
        tx
    });
    let (reply_tx, reply_rx) = mpsc::sync_channel(1);
    sender
        .send(Box::new(move || {
            let _ = reply_tx.send(job());
        }))
        .expect("the spawner thread lives as long as the program");
    reply_rx
        .recv()
        .expect("the spawner thread answers every job")
}

/// A started process whose output goes to a log file. Dropping it kills the
/// process (and anything it started) and reaps it.
#[derive(Debug)]
pub struct ManagedProcess {
    name: String,
    child: Child,
    log_path: PathBuf,
    stopped: bool,
    /// How it was started, so that [`Self::start_again`] starts it the same way.
    recipe: Recipe,
}

/// What a [`Command`] runs, kept because starting a `Command` spends it.
#[derive(Debug, Clone)]
struct Recipe {
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, Option<OsString>)>,
    dir: Option<PathBuf>,
}

impl Recipe {
    fn of(command: &Command) -> Self {
        Self {
            program: command.get_program().to_owned(),
            args: command.get_args().map(OsStr::to_owned).collect(),
            envs: command
                .get_envs()
                .map(|(k, v)| (k.to_owned(), v.map(OsStr::to_owned)))
                .collect(),
            dir: command.get_current_dir().map(Path::to_owned),
        }
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command.args(&self.args);
        for (key, value) in &self.envs {
            match value {
                Some(value) => command.env(key, value),
                None => command.env_remove(key),
            };
        }
        if let Some(dir) = &self.dir {
            command.current_dir(dir);
        }
        command
    }
}

impl ManagedProcess {
    /// Starts `command` with stdout and stderr appended to `log_path`, in its own
    /// process group (so a Ctrl-C meant for the test run reaches the harness, which
    /// then stops the control plane in order) and with a parent-death signal.
    pub fn spawn(name: &str, command: Command, log_path: &Path) -> Result<Self> {
        let recipe = Recipe::of(&command);
        let child = spawn_logged(name, command, log_path)?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log_path: log_path.to_owned(),
            stopped: false,
            recipe,
        })
    }

    /// Starts the process again as it was first started (program, arguments,
    /// environment, log), stopping it first if it still runs: a component restarted
    /// in place, for fault tests.
    pub fn start_again(&mut self) -> Result<()> {
        self.stop(Duration::from_secs(5));
        self.child = spawn_logged(&self.name, self.recipe.command(), &self.log_path)?;
        self.stopped = false;
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// `Some(status)` once the process has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Asks the process group to stop (SIGTERM), waits up to `grace`, then kills it.
    pub fn stop(&mut self, grace: Duration) {
        if self.stopped {
            return;
        }
        self.signal_group(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exit_status().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// Kills the process group at once and reaps the process.
    pub fn kill(&mut self) {
        if self.stopped {
            return;
        }
        self.signal_group(libc::SIGKILL);
        let _ = self.child.wait();
        self.stopped = true;
    }

    fn signal_group(&self, signal: libc::c_int) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: plain system calls on our own child's process group and pid.
        unsafe {
            if libc::kill(-pid, signal) != 0 {
                libc::kill(pid, signal);
            }
        }
    }

    /// The last `lines` lines of the process's log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path, lines)
    }
}

/// Starts `command` with its output appended to `log_path`, in its own process group
/// and with a parent-death signal (see the module documentation for why).
fn spawn_logged(name: &str, mut command: Command, log_path: &Path) -> Result<Child> {
    let log = File::options()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let log_err = log.try_clone()?;
    command
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err));
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe system calls.
    unsafe {
        command.pre_exec(move || {
            if libc::setpgid(0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl; then nobody
            // would ever stop this process.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let program = command.get_program().to_string_lossy().into_owned();
    on_spawner_thread(move || command.spawn())
        .with_context(|| format!("starting {name} ({program})"))
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `lines` lines of a file (reads at most the last 256 KiB).
pub fn tail(path: &Path, lines: usize) -> String {
    const WINDOW: u64 = 256 * 1024;
    let Ok(mut file) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(WINDOW)));
    // `split` drops the empty piece after a final newline, so the count is of real lines.
    let all: Vec<String> = BufReader::new(file)
        .split(b'\n')
        .map_while(|l| l.ok())
        .map(|l| String::from_utf8_lossy(&l).into_owned())
        .collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Reserves `n` distinct free TCP ports on 127.0.0.1. The listeners are released
/// before returning, so another program could take a port in between; the
/// control plane's start is retried once for that reason.
pub fn free_loopback_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind(("127.0.0.1", 0)))
        .collect::<io::Result<Vec<_>>>()
        .context("reserving free loopback ports")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// Runs `command` to the end: whether it succeeded, and its stdout then its stderr.
/// For short tools (helm, promtool); panics, naming the command, when it cannot start.
pub fn run_to_end(mut command: Command) -> (bool, String) {
    let what = format!("{command:?}");
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// As [`run_to_end`], and the command must succeed: its output, or a panic naming the
/// command and showing what it printed.
pub fn run_ok(command: Command) -> String {
    let what = format!("{command:?}");
    let (ok, text) = run_to_end(command);
    assert!(ok, "{what} failed:\n{text}");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_shows_the_last_lines_of_a_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        std::fs::write(&path, "one\ntwo\nthree\nfour\n").unwrap();
        assert_eq!(tail(&path, 2), "three\nfour");
        assert!(tail(&dir.path().join("missing.log"), 2).contains("no log"));
    }

    #[test]
    fn free_loopback_ports_are_distinct() {
        let ports = free_loopback_ports(5).unwrap();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 5, "{ports:?}");
    }

    #[test]
    fn a_dropped_process_is_killed_and_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let mut sleeper = Command::new("sleep");
        sleeper.arg("600");
        let process = ManagedProcess::spawn("sleeper", sleeper, &dir.path().join("s.log")).unwrap();
        let pid = process.pid();
        drop(process);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} survived"
        );
    }

    #[test]
    fn a_process_started_again_runs_as_it_first_ran() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("s.log");
        let mut command = Command::new("sh");
        command
            .args(["-c", "echo \"up with $CHATGATE_WORD\"; exec sleep 600"])
            .env("CHATGATE_WORD", "the same environment");
        let lines = |n: usize| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while tail(&log, 5).lines().count() < n && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            tail(&log, 5)
        };
        let mut process = ManagedProcess::spawn("sleeper", command, &log).unwrap();
        let first = process.pid();
        assert_eq!(lines(1), "up with the same environment");
        process.stop(Duration::from_secs(5));
        assert!(process.exit_status().is_some());
        process.start_again().unwrap();
        let second = process.pid();
        assert_ne!(first, second);
        assert!(process.exit_status().is_none(), "it runs again");
        assert_eq!(
            lines(2),
            "up with the same environment\nup with the same environment"
        );
        drop(process);
        assert!(!Path::new(&format!("/proc/{second}")).exists());
    }
}
