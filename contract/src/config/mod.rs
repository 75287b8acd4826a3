//! The configuration schema of the service, its validation and its parity rules.
//!
//! Every key is described once in [`KEYS`]. The service validates its process
//! environment with it at startup, the operator validates the configuration it is
//! about to roll out, and `chatgate-operator validate` checks manifests offline —
//! all through [`ConfigSet::validate`] and [`ConfigSet::parity_with`], so a key added
//! here is checked in all three places at once.

mod choices;
mod closest;
mod environment;
mod keys;
mod problem;
mod set;
mod value;

pub use crate::startup::CRITICAL_SERVICE_NAMES;
pub(crate) use choices::names_of;
pub use choices::{JwtAlgorithm, LlmProvider};
pub use closest::closest;
pub use environment::Environment;
pub use keys::{
    DATABASE_URL, JWT_ALGORITHMS, KEY_PREFIX, KEYS, Key, KeySpec, LLM_PROVIDERS, ParityRule,
    explain, key_spec,
};
pub use problem::{Problem, ProblemKind};
pub use set::{ConfigSet, ConfigValue, Origin, ParityPolicy, shared_database_problem};
pub use value::{ValueKind, url_scheme};
