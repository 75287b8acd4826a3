//! The chatgate chat service: a phased startup that produces every critical
//! service or exits naming the missing one, health endpoints, and the `/ws` chat.

// Chat backend: persistence, LLM providers, agent runs.
pub mod agent;
pub mod llm;
pub mod store;
