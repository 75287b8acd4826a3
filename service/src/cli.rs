//! Command line: run the service, or answer a question about its configuration
//! (`--print-config`, `--explain KEY`) and exit.

use crate::config;
use chatgate_contract::{ConfigSet, Origin};
use clap::Parser;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "chatgate-service",
    version = chatgate_contract::build_info::VERSION_LINE,
    about = "The chatgate chat service. Configured by CHATGATE_* environment variables (see --explain)."
)]
pub struct Cli {
    /// A YAML map of CHATGATE_* keys. Environment variables override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print the effective configuration with secrets redacted, and exit
    /// (exit code 1 if it is not valid, with every problem listed on stderr).
    #[arg(long)]
    pub print_config: bool,

    /// Describe a configuration key (every key when none is given), and exit.
    #[arg(long, value_name = "KEY", num_args = 0..=1, default_missing_value = "")]
    pub explain: Option<String>,
}

/// What the command line asks for.
pub enum Action {
    /// Run with this configuration.
    Run(ConfigSet),
    /// Done; exit with this code.
    Exit(i32),
}

impl Cli {
    pub fn action(&self) -> Action {
        if let Some(key) = &self.explain {
            return Action::Exit(explain(key));
        }
        let set = match config::load(self.config.as_deref(), std::env::vars()) {
            Ok(set) => set,
            Err(e) => {
                eprintln!("{e}");
                return Action::Exit(1);
            }
        };
        if self.print_config {
            return Action::Exit(print_config(&set));
        }
        Action::Run(set)
    }
}

fn explain(key: &str) -> i32 {
    if key.is_empty() {
        for key in config::all_keys() {
            if let Some(text) = chatgate_contract::explain(key) {
                println!("{text}\n");
            }
        }
        return 0;
    }
    match chatgate_contract::explain(key) {
        Some(text) => {
            println!("{text}");
            0
        }
        None => {
            eprintln!(
                "{key} is not a chatgate configuration key; known keys: {}",
                config::all_keys().collect::<Vec<_>>().join(", ")
            );
            1
        }
    }
}

fn print_config(set: &ConfigSet) -> i32 {
    for (key, value) in set.redacted() {
        println!("{key}={value}");
    }
    let problems = set.validate(Origin::Process);
    for p in &problems {
        eprintln!("{p}");
    }
    i32::from(!problems.is_empty())
}
