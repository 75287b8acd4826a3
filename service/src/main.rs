//! The `chatgate-service` binary: parses the command line and runs the service.

use chatgate_service::cli::{Action, Cli};
use clap::Parser;
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let started = Instant::now();
    let set = match Cli::parse().action() {
        Action::Run(set) => set,
        Action::Exit(code) => return exit(code),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return exit(1);
        }
    };
    let code = runtime.block_on(chatgate_service::server::run(set, started));
    // Sockets still open after the close grace are dropped, not waited for.
    runtime.shutdown_timeout(Duration::from_millis(500));
    exit(code)
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
