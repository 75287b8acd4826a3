//! A real PostgreSQL server for tests and benchmarks: initialised in a temporary
//! directory, listening on a loopback port, stopped when dropped.
//!
//! The server binaries come from the machine (Debian's `postgresql` package puts them
//! in `/usr/lib/postgresql/<major>/bin`); `hack/postgres.sh` (run by `make test`)
//! installs them where they are absent. A machine without them makes
//! [`Postgres::start`] fail with that command, never a silent pass.

use anyhow::{Context, Result, bail};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Overrides where the server binaries are looked for.
pub const BIN_ENV: &str = "CHATGATE_POSTGRES_BIN";

/// The user every test database belongs to (trust authentication on loopback).
pub const USER: &str = "chat";

/// The unprivileged account the server runs as when the tests run as root:
/// PostgreSQL refuses to start as root.
const NOBODY: u32 = 65534;

/// How long the server may take to accept connections after a (re)start.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// A running PostgreSQL server.
pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    server: Option<Child>,
    as_nobody: bool,
    dir: tempfile::TempDir,
}

impl Postgres {
    /// Initialises a fresh cluster and starts it on a free loopback port. `fsync` is
    /// off: the outages tests make are process kills, which the WAL written to the
    /// kernel survives; only a machine crash would need it.
    pub fn start() -> Result<Postgres> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new().prefix("chatgate-pg-").tempdir()?;
        let as_nobody = running_as_root();
        if as_nobody {
            std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY))?;
        }
        let data = dir.path().join("data");
        let mut pg = Postgres {
            bin,
            data,
            port: free_port()?,
            server: None,
            as_nobody,
            dir,
        };
        let output = pg
            .command("initdb")
            .args(["-A", "trust", "-U", USER, "--no-sync", "-E", "UTF8", "-D"])
            .arg(&pg.data)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .context("run initdb")?;
        if !output.status.success() {
            bail!(
                "initdb failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        pg.start_server()?;
        Ok(pg)
    }

    /// `postgres://chat@127.0.0.1:PORT/DATABASE`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// The URL of the `postgres` database, which always exists.
    pub fn default_url(&self) -> String {
        self.url("postgres")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates an empty database and returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String> {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""))?;
        Ok(self.url(name))
    }

    /// Runs SQL with `psql` and returns its unaligned, tuples-only output.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String> {
        let output = Command::new(self.bin.join("psql"))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                USER,
                "-d",
                database,
                "-c",
                sql,
            ])
            .stdin(Stdio::null())
            .output()
            .context("run psql")?;
        if !output.status.success() {
            bail!(
                "psql `{sql}` failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// Stops the server the way an outage does (`immediate`: no checkpoint, open
    /// connections cut). Its data and port stay for [`Postgres::resume`].
    pub fn stop(&mut self) -> Result<()> {
        self.pg_ctl_stop("immediate")?;
        if let Some(mut server) = self.server.take() {
            let _ = server.wait();
        }
        Ok(())
    }

    /// Starts the stopped server again on the same port with the same data.
    pub fn resume(&mut self) -> Result<()> {
        self.start_server()
    }

    fn start_server(&mut self) -> Result<()> {
        let socket_dir = self.dir.path().to_path_buf();
        let server = self
            .command("postgres")
            .arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string()])
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=200",
            ])
            .args(["-c", "fsync=off"])
            .arg("-k")
            .arg(&socket_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start postgres")?;
        self.server = Some(server);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", USER, "-d", "postgres"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if let Some(server) = self.server.as_mut()
                && let Ok(Some(status)) = server.try_wait()
            {
                bail!("postgres exited during startup with {status}");
            }
            if Instant::now() > deadline {
                bail!(
                    "postgres on 127.0.0.1:{} did not accept connections within {}s",
                    self.port,
                    READY_WITHIN.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<()> {
        let status = self
            .command("pg_ctl")
            .args(["stop", "-w", "-m", mode, "-D"])
            .arg(&self.data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("run pg_ctl stop")?;
        if !status.success() {
            bail!("pg_ctl stop -m {mode} failed with {status}");
        }
        Ok(())
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        command.current_dir(self.dir.path());
        if self.as_nobody {
            command.uid(NOBODY).gid(NOBODY);
        }
        command
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.server.is_some() {
            let _ = self.pg_ctl_stop("immediate");
        }
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

/// Where the server binaries are: `$CHATGATE_POSTGRES_BIN`, the newest
/// `/usr/lib/postgresql/<major>/bin`, or `PATH`.
pub fn bin_dir() -> Result<PathBuf> {
    let has_server = |dir: &Path| {
        ["postgres", "initdb", "pg_ctl", "pg_isready", "psql"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    if let Some(dir) = std::env::var_os(BIN_ENV) {
        let dir = PathBuf::from(dir);
        if has_server(&dir) {
            return Ok(dir);
        }
        bail!(
            "{BIN_ENV}={} has no PostgreSQL server binaries (postgres, initdb, pg_ctl, pg_isready, psql)",
            dir.display()
        );
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((major, entry.path().join("bin")))
        })
        .collect();
    versions.sort();
    let from_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    versions
        .into_iter()
        .rev()
        .map(|(_, dir)| dir)
        .chain(from_path)
        .find(|dir| has_server(dir))
        .with_context(|| {
            format!(
                "no PostgreSQL server binaries on this machine (postgres, initdb, pg_ctl, pg_isready, psql); \
                 install them with `hack/postgres.sh` (Debian: apt-get install postgresql) or point {BIN_ENV} at their directory"
            )
        })
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
