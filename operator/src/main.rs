//! `chatgate-operator`: run the controller (default), or the offline commands `crd`,
//! `render` and `validate`.

use chatgate_operator::render::{RenderArgs, RenderError, render};
use chatgate_operator::run::{Health, Options, run};
use chatgate_operator::smoke::SmokeArgs;
use chatgate_operator::validate_cmd::{self, ValidateArgs};
use clap::{Parser, Subcommand};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(
    name = "chatgate-operator",
    version = chatgate_contract::build_info::VERSION_LINE,
    about = "Reconciles ChatService resources into gated chat workloads"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Log format: `json` (for clusters) or `text`.
    #[arg(
        long,
        global = true,
        env = "CHATGATE_OPERATOR_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller (the default).
    Run(Options),
    /// Print the ChatService CustomResourceDefinition as YAML.
    Crd,
    /// Print what ChatService manifests become: the children the operator would apply,
    /// or a Cloud Run / Knative service (`--target`).
    Render(RenderArgs),
    /// Check ChatService manifests offline: configuration, references and parity.
    Validate(ValidateArgs),
    /// Check a deployed service from outside, as a pipeline step after a deploy: the
    /// health endpoint, a WebSocket upgrade with a token, a ping and one chat round
    /// trip. Exit status 0 when all pass, 1 when one fails, 2 when it cannot start.
    Smoke(SmokeArgs),
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if cli.command.is_none() {
        // No subcommand means `run`, with its flags and environment variables.
        let mut args = std::env::args_os();
        let argv0 = args.next().unwrap_or_else(|| "chatgate-operator".into());
        cli = Cli::parse_from(
            std::iter::once(argv0)
                .chain(std::iter::once("run".into()))
                .chain(args),
        );
    }
    let Some(command) = cli.command else {
        return ExitCode::FAILURE;
    };
    match command {
        Command::Crd => match chatgate_operator::crd::manifest() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: printing the CRD: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Render(args) => match render(&args) {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(RenderError::Refused(lines)) => {
                for line in lines {
                    eprintln!("error: {line}");
                }
                ExitCode::FAILURE
            }
            Err(RenderError::Unreadable(e)) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Smoke(args) => smoke(&args),
        Command::Validate(args) => {
            ExitCode::from(u8::try_from(validate_cmd::run(&args)).unwrap_or(2))
        }
        Command::Run(options) => {
            init_logging(&cli.log_format);
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run_operator(options)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "the operator stopped");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn smoke(args: &SmokeArgs) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(chatgate_operator::smoke::run(args)) {
        Ok(checks) => {
            if args.output == "json" {
                for check in &checks {
                    println!("{}", serde_json::to_string(check).unwrap_or_default());
                }
            } else {
                print!("{}", chatgate_operator::smoke::table(&checks));
            }
            if chatgate_operator::smoke::passed(&checks) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run_operator(options: Options) -> anyhow::Result<()> {
    let client = chatgate_operator::run::api_client(kube::Config::infer().await?)?;
    let health = Arc::new(Health::default());
    run(
        client,
        options,
        health,
        chatgate_operator::controller::system_clock(),
        shutdown_signal(),
    )
    .await
}

/// SIGTERM (the kubelet) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            let _ = ctrl_c.await;
            return;
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}

fn init_logging(format: &str) {
    // The lease library logs every renewal at info; its warnings are what matter.
    chatgate_logging::init(
        chatgate_logging::LogFormat::from_config(Some(format)),
        "info,kube_lease_manager=warn",
    );
}
