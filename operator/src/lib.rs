//! The chatgate operator: reconciles `ChatService` resources into gated workloads,
//! and the offline `crd`, `render` and `validate` commands.

pub mod configuration;
pub mod crd;
pub mod dereference;
pub mod validate_cmd;
pub mod validation;
pub mod watches;
