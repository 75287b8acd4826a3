//! The key table: every configuration key the service reads, with its type, default,
//! secrecy, requirements, parity rule and the critical service it feeds.

use super::{Environment, JwtAlgorithm, LlmProvider, ValueKind};
use crate::startup::CriticalService;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Prefix every service configuration key carries (they are environment variables).
pub const KEY_PREFIX: &str = "CHATGATE_";

/// How a key of a non-production configuration must relate to the production baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParityRule {
    /// Must be equal to production (protocol version, critical services, JWT algorithm).
    Match,
    /// Must be set in both; values may differ (database URL, LLM key Secret).
    Present,
    /// May differ or be absent (limits, listen address).
    Free,
}

impl ParityRule {
    pub fn as_str(self) -> &'static str {
        match self {
            ParityRule::Match => "match",
            ParityRule::Present => "present",
            ParityRule::Free => "free",
        }
    }
}

/// One configuration key, described once for the service, the operator and `validate`.
#[derive(Debug, Clone, Copy)]
pub struct KeySpec {
    /// The key; its name (the environment variable) is [`Key::as_str`].
    pub key: Key,
    pub kind: ValueKind,
    pub default: Option<&'static str>,
    /// The value is a secret: it lives in a Secret, is redacted in output, and is
    /// compared only for presence.
    pub secret: bool,
    /// Environments in which the key must be set (subject to `required_when`).
    pub required_in: &'static [Environment],
    /// Required only when another key's effective value is one of these.
    pub required_when: Option<(Key, &'static [&'static str])>,
    pub parity: ParityRule,
    /// The critical service a bad value breaks (startup names it on the termination
    /// line); `None` for process-wide keys, which break the configuration itself.
    pub feeds: Option<CriticalService>,
    pub description: &'static str,
}

const ALL_ENVS: &[Environment] = &Environment::ALL;
const SHARED_ENVS: &[Environment] = &[Environment::Staging, Environment::Production];

/// Kept for readers of the earlier names; the lists are the enums' own.
pub const JWT_ALGORITHMS: &[&str] = &JwtAlgorithm::NAMES;
pub const LLM_PROVIDERS: &[&str] = &LlmProvider::NAMES;

/// Builds [`Key`] and [`KEYS`] from one list, so a key's variant, name and spec can
/// never drift apart and `KEYS[key as usize]` is that key's spec.
macro_rules! key_table {
    ($($variant:ident = $name:literal { $($field:ident: $value:expr),* $(,)? })*) => {
        /// A configuration key the service reads. Its name is the environment
        /// variable, e.g. `CHATGATE_JWT_ALGORITHM`; free-form input (spec.config, a
        /// ConfigMap, the process environment) becomes a `Key` through [`Key::lookup`]
        /// or [`FromStr`], and a name that is none is reported as unknown.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[allow(
            clippy::enum_variant_names,
            reason = "variants spell the variable names, e.g. CHATGATE_LLM_API_KEY"
        )]
        pub enum Key {
            $($variant,)*
        }

        impl Key {
            /// Every key, in table order.
            pub const ALL: [Key; [$($name),*].len()] = [$(Key::$variant),*];

            /// The environment variable name, which is the key's name everywhere.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Key::$variant => $name,)*
                }
            }
        }

        /// Every key's spec, in the order of [`Key::ALL`].
        pub const KEYS: &[KeySpec] = &[
            $(KeySpec { key: Key::$variant, $($field: $value),* },)*
        ];
    };
}

impl Key {
    /// The key of this name, if chatgate knows it.
    pub fn lookup(name: &str) -> Option<Key> {
        Key::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// What the key is: type, default, rules, description.
    pub fn spec(self) -> &'static KeySpec {
        &KEYS[self as usize]
    }

    /// The critical service a bad value of this key breaks; process-wide keys break
    /// the configuration itself.
    pub fn service(self) -> CriticalService {
        self.spec().feeds.unwrap_or(CriticalService::Configuration)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Key {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Key::lookup(s).ok_or_else(|| format!("`{s}` is not a chatgate configuration key"))
    }
}

/// A key reads as its name wherever a name is expected (lengths, comparisons, maps
/// keyed by name).
impl std::ops::Deref for Key {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl From<Key> for String {
    fn from(key: Key) -> String {
        key.as_str().to_string()
    }
}

impl PartialEq<str> for Key {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Key {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Key {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<Key> for String {
    fn eq(&self, other: &Key) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<Key> for &str {
    fn eq(&self, other: &Key) -> bool {
        *self == other.as_str()
    }
}

/// The key that chooses the thread store, by name (for free-form comparisons).
pub const DATABASE_URL: &str = Key::DatabaseUrl.as_str();

// Every key the service reads, each written once: its variant of `Key`, its variable
// name and its `KeySpec`. Order is the order of `--print-config` and tables.
key_table! {
    Env = "CHATGATE_ENV" {
        kind: ValueKind::OneOf(&Environment::NAMES),
        default: Some(Environment::DEFAULT.as_str()),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        feeds: None,
        description: "Which environment this configuration is for. Staging and production require real secrets; development generates a JWT secret and prints a token.",
    }
    Listen = "CHATGATE_LISTEN" {
        kind: ValueKind::SocketAddr,
        default: Some("127.0.0.1:8080"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        feeds: None,
        description: "Address the HTTP and WebSocket server binds (the operator sets 0.0.0.0:8080 in pods).",
    }
    ProtocolVersion = "CHATGATE_PROTOCOL_VERSION" {
        kind: ValueKind::Integer { min: 1, max: 1 },
        default: Some("1"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Match,
        feeds: None,
        description: "WebSocket wire protocol version served at /ws. Clients of every environment speak the same protocol.",
    }
    JwtAlgorithm = "CHATGATE_JWT_ALGORITHM" {
        kind: ValueKind::OneOf(&JwtAlgorithm::NAMES),
        default: Some(JwtAlgorithm::DEFAULT.as_str()),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Match,
        feeds: Some(CriticalService::JwtVerifier),
        description: "The only JWT algorithm accepted on /ws. HS256 uses CHATGATE_JWT_SECRET; RS256/ES256 use CHATGATE_JWT_PUBLIC_KEY or CHATGATE_JWT_JWKS_FILE.",
    }
    JwtSecret = "CHATGATE_JWT_SECRET" {
        kind: ValueKind::Text,
        default: None,
        secret: true,
        required_in: SHARED_ENVS,
        required_when: Some((Key::JwtAlgorithm, &[JwtAlgorithm::HS256.as_str()])),
        parity: ParityRule::Present,
        feeds: Some(CriticalService::JwtVerifier),
        description: "HMAC secret for HS256 tokens (at least 32 bytes in staging and production). In development a random one is generated when unset.",
    }
    JwtPublicKey = "CHATGATE_JWT_PUBLIC_KEY" {
        kind: ValueKind::Text,
        default: None,
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        feeds: Some(CriticalService::JwtVerifier),
        description: "PEM public key for RS256/ES256 tokens (or use CHATGATE_JWT_JWKS_FILE).",
    }
    JwtJwksFile = "CHATGATE_JWT_JWKS_FILE" {
        kind: ValueKind::Path,
        default: None,
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        feeds: Some(CriticalService::JwtVerifier),
        description: "Path to a local JWKS file whose keys verify RS256/ES256 tokens (selected by `kid`).",
    }
    JwtIssuer = "CHATGATE_JWT_ISSUER" {
        kind: ValueKind::Text,
        default: None,
        secret: false,
        required_in: SHARED_ENVS,
        required_when: None,
        parity: ParityRule::Match,
        feeds: Some(CriticalService::JwtVerifier),
        description: "Required `iss` claim of tokens.",
    }
    JwtAudience = "CHATGATE_JWT_AUDIENCE" {
        kind: ValueKind::Text,
        default: None,
        secret: false,
        required_in: SHARED_ENVS,
        required_when: None,
        parity: ParityRule::Present,
        feeds: Some(CriticalService::JwtVerifier),
        description: "Required `aud` claim of tokens (may differ per environment).",
    }
    JwtLeewaySeconds = "CHATGATE_JWT_LEEWAY_SECONDS" {
        kind: ValueKind::Integer { min: 0, max: 300 },
        default: Some("30"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        feeds: Some(CriticalService::JwtVerifier),
        description: "Clock skew tolerated when checking exp and nbf.",
    }
    DatabaseUrl = "CHATGATE_DATABASE_URL" {
        kind: ValueKind::Url,
        default: Some("sqlite::memory:"),
        secret: true,
        required_in: SHARED_ENVS,
        required_when: None,
        parity: ParityRule::Present,
        feeds: Some(CriticalService::ThreadStore),
        description: "Thread store: sqlite://PATH (file), sqlite::memory: or postgres://... In staging and production it must be set explicitly.",
    }
    LlmProvider = "CHATGATE_LLM_PROVIDER" {
        kind: ValueKind::OneOf(&LlmProvider::NAMES),
        default: Some(LlmProvider::DEFAULT.as_str()),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Match,
        feeds: Some(CriticalService::LlmClient),
        description: "builtin: a deterministic offline agent. openai: an OpenAI-compatible chat-completions API (needs CHATGATE_LLM_API_KEY).",
    }
    LlmApiKey = "CHATGATE_LLM_API_KEY" {
        kind: ValueKind::Text,
        default: None,
        secret: true,
        required_in: ALL_ENVS,
        required_when: Some((Key::LlmProvider, &[LlmProvider::Openai.as_str()])),
        parity: ParityRule::Present,
        feeds: Some(CriticalService::LlmClient),
        description: "API key of the LLM provider. Without it the agent supervisor cannot run agents.",
    }
    LlmBaseUrl = "CHATGATE_LLM_BASE_URL" {
        kind: ValueKind::Url,
        default: Some("https://api.openai.com/v1"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        feeds: Some(CriticalService::LlmClient),
        description: "Base URL of the OpenAI-compatible API (…/v1).",
    }
    LlmModel = "CHATGATE_LLM_MODEL" {
        kind: ValueKind::Text,
        default: Some("gpt-4o-mini"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        feeds: Some(CriticalService::LlmClient),
        description: "Model name sent to the LLM provider.",
    }
    MaxMessageBytes = "CHATGATE_MAX_MESSAGE_BYTES" {
        kind: ValueKind::Integer {
            min: 256,
            max: 16 * 1024 * 1024,
        },
        default: Some("65536"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        feeds: Some(CriticalService::WsBridge),
        description: "Largest WebSocket message accepted; larger ones close the socket with 1009.",
    }
    MaxConnections = "CHATGATE_MAX_CONNECTIONS" {
        kind: ValueKind::Integer {
            min: 1,
            max: 1_000_000,
        },
        default: Some("20000"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        feeds: Some(CriticalService::WsBridge),
        description: "Open WebSockets per process; beyond it new sockets are closed with 1013.",
    }
    MaxConnectionsPerUser = "CHATGATE_MAX_CONNECTIONS_PER_USER" {
        kind: ValueKind::Integer {
            min: 1,
            max: 10_000,
        },
        default: Some("16"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        feeds: Some(CriticalService::WsBridge),
        description: "Open WebSockets per user; beyond it new sockets are closed with 1013.",
    }
    RunsPerMinute = "CHATGATE_RUNS_PER_MINUTE" {
        kind: ValueKind::Integer {
            min: 1,
            max: 100_000,
        },
        default: Some("30"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        feeds: Some(CriticalService::AgentSupervisor),
        description: "Agent runs a user may start per minute (pings are not limited).",
    }
    MaxConcurrentRuns = "CHATGATE_MAX_CONCURRENT_RUNS" {
        kind: ValueKind::Integer {
            min: 1,
            max: 100_000,
        },
        default: Some("1024"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        feeds: Some(CriticalService::AgentSupervisor),
        description: "Agent runs one process executes at once; beyond it a message gets `error overloaded` and is not stored (send it again shortly).",
    }
    RunTimeoutSeconds = "CHATGATE_RUN_TIMEOUT_SECONDS" {
        kind: ValueKind::Integer { min: 5, max: 3_600 },
        default: Some("300"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        feeds: Some(CriticalService::AgentSupervisor),
        description: "Longest an agent run may take from start to its last reply chunk; a slower one ends with `error run_timeout` (the message stays stored).",
    }
    MaxReplyBytes = "CHATGATE_MAX_REPLY_BYTES" {
        kind: ValueKind::Integer {
            min: 1_024,
            max: 16 * 1024 * 1024,
        },
        default: Some("262144"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        feeds: Some(CriticalService::AgentSupervisor),
        description: "Largest reply an agent run may stream; a longer one ends with `error reply_too_large` and is not stored.",
    }
    HeaderTimeoutSeconds = "CHATGATE_HEADER_TIMEOUT_SECONDS" {
        kind: ValueKind::Integer { min: 1, max: 120 },
        default: Some("10"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        feeds: None,
        description: "A new connection must send its first request's headers within this many seconds, or it is closed (at most 1024 connections wait for theirs at once).",
    }
    IdleTimeoutSeconds = "CHATGATE_IDLE_TIMEOUT_SECONDS" {
        kind: ValueKind::Integer {
            min: 5,
            max: 86_400,
        },
        default: Some("300"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        feeds: Some(CriticalService::WsBridge),
        description: "A socket with no frame from the client for this long is closed.",
    }
    KeepaliveSeconds = "CHATGATE_KEEPALIVE_SECONDS" {
        kind: ValueKind::Integer { min: 1, max: 3_600 },
        default: Some("30"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        feeds: Some(CriticalService::WsBridge),
        description: "Interval of server WebSocket pings that keep idle proxies from cutting the socket.",
    }
    SendQueue = "CHATGATE_SEND_QUEUE" {
        kind: ValueKind::Integer {
            min: 1,
            max: 65_536,
        },
        default: Some("64"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        feeds: Some(CriticalService::WsBridge),
        description: "Frames queued per socket; a client that lets it fill is disconnected (1013) instead of growing memory.",
    }
    SendTimeoutSeconds = "CHATGATE_SEND_TIMEOUT_SECONDS" {
        kind: ValueKind::Integer { min: 1, max: 300 },
        default: Some("10"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        feeds: Some(CriticalService::WsBridge),
        description: "A frame the client has not taken off the socket within this time means it stopped reading; it is disconnected.",
    }
    AllowedOrigins = "CHATGATE_ALLOWED_ORIGINS" {
        kind: ValueKind::List(None),
        default: None,
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        feeds: Some(CriticalService::WsBridge),
        description: "Origins allowed to open /ws from a browser; empty allows any.",
    }
    DrainSeconds = "CHATGATE_DRAIN_SECONDS" {
        kind: ValueKind::Integer { min: 0, max: 600 },
        default: Some("5"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        feeds: None,
        description: "After SIGTERM: seconds readiness reports 503 before open sockets get 1012.",
    }
    StartupBudgetSeconds = "CHATGATE_STARTUP_BUDGET_SECONDS" {
        kind: ValueKind::Integer { min: 1, max: 3_600 },
        default: Some("60"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        feeds: None,
        description: "Time startup may spend waiting on dependencies before it gives up and exits.",
    }
    TerminationLog = "CHATGATE_TERMINATION_LOG" {
        kind: ValueKind::Path,
        default: Some("/dev/termination-log"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        feeds: None,
        description: "Where a failed startup writes its one-line reason (Kubernetes shows it in the pod status).",
    }
    LogFormat = "CHATGATE_LOG_FORMAT" {
        kind: ValueKind::OneOf(&["text", "json"]),
        default: Some("text"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        feeds: None,
        description: "text for people, json (severity, message, time) for log collectors.",
    }
}

/// The description of the key of this name, if chatgate knows it.
pub fn key_spec(key: &str) -> Option<&'static KeySpec> {
    Key::lookup(key).map(Key::spec)
}

/// What `--explain KEY` prints.
pub fn explain(key: &str) -> Option<String> {
    let k = key_spec(key)?;
    let required = if k.required_in.is_empty() {
        "never".to_string()
    } else {
        let envs = k
            .required_in
            .iter()
            .map(|e| e.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        match k.required_when {
            Some((other, values)) => format!("in {envs}, when {other} is {}", values.join(" or ")),
            None => format!("in {envs}"),
        }
    };
    Some(format!(
        "{key}\n  {desc}\n  type:     {ty}\n  default:  {default}\n  secret:   {secret}\n  required: {required}\n  parity:   {parity} ({parity_desc})",
        key = k.key,
        desc = k.description,
        ty = k.kind.describe(),
        default = k.default.unwrap_or("(none)"),
        secret = if k.secret {
            "yes (keep it in a Secret)"
        } else {
            "no"
        },
        parity = k.parity.as_str(),
        parity_desc = match k.parity {
            ParityRule::Match => "must equal the production baseline",
            ParityRule::Present => "must be set in both this environment and production",
            ParityRule::Free => "may differ from production",
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::value::Shown;

    #[test]
    fn every_default_passes_its_own_type_check() {
        for k in KEYS {
            if let Some(d) = k.default {
                k.kind
                    .check(d, Shown::Quoted)
                    .unwrap_or_else(|e| panic!("{}: {e}", k.key));
            }
        }
    }

    #[test]
    fn explain_describes_every_key() {
        for k in KEYS {
            let text = explain(k.key.as_str()).unwrap();
            assert!(text.contains(k.description));
            assert!(text.contains("parity:"));
        }
        assert!(explain("CHATGATE_NOPE").is_none());
    }

    #[test]
    fn every_key_is_its_own_spec_and_round_trips_by_name() {
        assert_eq!(KEYS.len(), Key::ALL.len());
        for (spec, key) in KEYS.iter().zip(Key::ALL) {
            assert_eq!(spec.key, key);
            assert_eq!(key.spec().key, key);
            assert!(key.as_str().starts_with(KEY_PREFIX), "{key}");
            assert_eq!(key.as_str().parse::<Key>(), Ok(key));
            assert_eq!(key_spec(key.as_str()).map(|s| s.key), Some(key));
        }
        assert_eq!(Key::lookup("CHATGATE_NOPE"), None);
        assert_eq!(format!("{:>14}|", Key::Env), "  CHATGATE_ENV|");
    }

    /// A key with no critical service makes a bad value of it end startup in the
    /// `configuration` phase; that must be a decision, so the process-wide keys are
    /// listed here and a new key must either name the service it feeds or join them.
    #[test]
    fn every_key_names_the_service_it_feeds_or_is_process_wide() {
        let process_wide = [
            Key::Env,
            Key::Listen,
            Key::HeaderTimeoutSeconds,
            Key::ProtocolVersion,
            Key::DrainSeconds,
            Key::StartupBudgetSeconds,
            Key::TerminationLog,
            Key::LogFormat,
        ];
        for key in Key::ALL {
            assert_eq!(
                key.spec().feeds.is_none(),
                process_wide.contains(&key),
                "{key}: name the critical service it feeds, or list it as process-wide"
            );
        }
        assert_eq!(Key::DatabaseUrl.service(), CriticalService::ThreadStore);
        assert_eq!(Key::LogFormat.service(), CriticalService::Configuration);
    }

    #[test]
    fn choice_keys_take_their_names_and_defaults_from_the_types() {
        assert_eq!(
            Key::JwtAlgorithm.spec().kind,
            ValueKind::OneOf(&["HS256", "RS256", "ES256"])
        );
        assert_eq!(Key::JwtAlgorithm.spec().default, Some("HS256"));
        assert_eq!(Key::LlmProvider.spec().default, Some("builtin"));
        assert_eq!(Key::Env.spec().default, Some("development"));
    }
}
