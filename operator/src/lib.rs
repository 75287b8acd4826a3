//! The chatgate operator: reconciles `ChatService` resources into gated workloads,
//! and the offline `crd`, `render` and `validate` commands.
//!
//! The reconcile is a visible pipeline, one module per step, each handing the next a
//! value only it can make:
//! [`validation`] (read what the spec points at, validate; a
//! [`validation::ValidatedSpec`] only when nothing blocks the rollout) → [`build`]
//! (pure: desired children of that spec) → [`apply`] (server-side apply, nothing
//! written when nothing changed; an [`apply::Applied`]) → [`status`] (pure: conditions
//! from what was applied, or why nothing was, and what is observed) — wired together
//! in [`controller`].

pub mod apply;
pub mod build;
pub mod conditions;
pub mod configuration;
pub mod controller;
pub mod crd;
pub mod dereference;
pub mod fixtures;
pub mod manifests;
pub mod meta;
pub mod metrics;
pub mod render;
pub mod run;
pub mod serverless;
pub mod smoke;
pub mod status;
pub mod validate_cmd;
pub mod validation;
pub mod watches;
