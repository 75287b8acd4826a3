//! The chatgate chat service: a phased startup that produces every critical
//! service or exits naming the missing one, health endpoints, and the `/ws` chat.

// Chat backend: persistence, LLM providers, agent runs.
pub mod agent;
pub mod llm;
pub mod protocol;
pub mod store;

pub mod auth;
pub mod bridge;
pub mod chat;
pub mod cli;
pub mod config;
pub mod fuzzing;
pub mod logging;
pub mod metrics;
pub mod replicas;
pub mod server;
pub mod startup;
pub mod ws;
