//! The chatgate chat service: a phased startup that produces every critical
//! service or exits naming the missing one, health endpoints, and the `/ws` chat.
//!
//! Public are what the binary (`cli`, `server::run`), the integration tests
//! (`agent`, `protocol`, `store`, `llm`), the fuzz targets (`fuzzing`) and the
//! control-plane harness (`config`) use; everything else is private to the crate.

// Chat backend: the wire protocol, persistence, LLM providers, agent runs.
pub mod agent;
pub mod llm;
pub mod protocol;
pub mod store;

pub mod cli;
pub mod config;
pub mod fuzzing;
pub mod server;

mod auth;
mod bridge;
mod chat;
mod instance;
mod metrics;
mod replicas;
mod startup;
mod ws;

/// The log line format, shared with the operator.
use chatgate_logging as logging;
