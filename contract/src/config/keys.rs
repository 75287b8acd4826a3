//! The key table: every configuration key the service reads, with its type, default,
//! secrecy, requirements and parity rule.

use super::{Environment, ValueKind};
use serde::{Deserialize, Serialize};

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

/// The key that chooses the thread store.
pub const DATABASE_URL: &str = "CHATGATE_DATABASE_URL";

/// One configuration key, described once for the service, the operator and `validate`.
#[derive(Debug, Clone, Copy)]
pub struct KeySpec {
    /// The environment variable name, which is also the key's name everywhere.
    pub key: &'static str,
    pub kind: ValueKind,
    pub default: Option<&'static str>,
    /// The value is a secret: it lives in a Secret, is redacted in output, and is
    /// compared only for presence.
    pub secret: bool,
    /// Environments in which the key must be set (subject to `required_when`).
    pub required_in: &'static [Environment],
    /// Required only when another key's effective value is one of these.
    pub required_when: Option<(&'static str, &'static [&'static str])>,
    pub parity: ParityRule,
    pub description: &'static str,
}

const ALL_ENVS: &[Environment] = &[
    Environment::Development,
    Environment::Staging,
    Environment::Production,
];
const SHARED_ENVS: &[Environment] = &[Environment::Staging, Environment::Production];

pub const CRITICAL_SERVICE_NAMES: &[&str] = &[
    "configuration",
    "jwt_verifier",
    "thread_store",
    "llm_client",
    "ws_bridge",
    "agent_supervisor",
];
pub const JWT_ALGORITHMS: &[&str] = &["HS256", "RS256", "ES256"];
pub const LLM_PROVIDERS: &[&str] = &["builtin", "openai"];

/// Every key the service reads. Order is the order of `--print-config` and tables.
pub const KEYS: &[KeySpec] = &[
    KeySpec {
        key: "CHATGATE_ENV",
        kind: ValueKind::OneOf(&["development", "staging", "production"]),
        default: Some("development"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        description: "Which environment this configuration is for. Staging and production require real secrets; development generates a JWT secret and prints a token.",
    },
    KeySpec {
        key: "CHATGATE_LISTEN",
        kind: ValueKind::SocketAddr,
        default: Some("127.0.0.1:8080"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        description: "Address the HTTP and WebSocket server binds (the operator sets 0.0.0.0:8080 in pods).",
    },
    KeySpec {
        key: "CHATGATE_PROTOCOL_VERSION",
        kind: ValueKind::Integer { min: 1, max: 1 },
        default: Some("1"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Match,
        description: "WebSocket wire protocol version served at /ws. Clients of every environment speak the same protocol.",
    },
    KeySpec {
        key: "CHATGATE_CRITICAL_SERVICES",
        kind: ValueKind::List(Some(CRITICAL_SERVICE_NAMES)),
        default: Some(
            "configuration,jwt_verifier,thread_store,llm_client,ws_bridge,agent_supervisor",
        ),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Match,
        description: "Critical services startup must produce before /health/startup answers 200. Must be the same list as production.",
    },
    KeySpec {
        key: "CHATGATE_JWT_ALGORITHM",
        kind: ValueKind::OneOf(JWT_ALGORITHMS),
        default: Some("HS256"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Match,
        description: "The only JWT algorithm accepted on /ws. HS256 uses CHATGATE_JWT_SECRET; RS256/ES256 use CHATGATE_JWT_PUBLIC_KEY or CHATGATE_JWT_JWKS_FILE.",
    },
    KeySpec {
        key: "CHATGATE_JWT_SECRET",
        kind: ValueKind::Text,
        default: None,
        secret: true,
        required_in: SHARED_ENVS,
        required_when: Some(("CHATGATE_JWT_ALGORITHM", &["HS256"])),
        parity: ParityRule::Present,
        description: "HMAC secret for HS256 tokens (at least 32 bytes in staging and production). In development a random one is generated when unset.",
    },
    KeySpec {
        key: "CHATGATE_JWT_PUBLIC_KEY",
        kind: ValueKind::Text,
        default: None,
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        description: "PEM public key for RS256/ES256 tokens (or use CHATGATE_JWT_JWKS_FILE).",
    },
    KeySpec {
        key: "CHATGATE_JWT_JWKS_FILE",
        kind: ValueKind::Path,
        default: None,
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        description: "Path to a local JWKS file whose keys verify RS256/ES256 tokens (selected by `kid`).",
    },
    KeySpec {
        key: "CHATGATE_JWT_ISSUER",
        kind: ValueKind::Text,
        default: None,
        secret: false,
        required_in: SHARED_ENVS,
        required_when: None,
        parity: ParityRule::Match,
        description: "Required `iss` claim of tokens.",
    },
    KeySpec {
        key: "CHATGATE_JWT_AUDIENCE",
        kind: ValueKind::Text,
        default: None,
        secret: false,
        required_in: SHARED_ENVS,
        required_when: None,
        parity: ParityRule::Present,
        description: "Required `aud` claim of tokens (may differ per environment).",
    },
    KeySpec {
        key: "CHATGATE_JWT_LEEWAY_SECONDS",
        kind: ValueKind::Integer { min: 0, max: 300 },
        default: Some("30"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        description: "Clock skew tolerated when checking exp and nbf.",
    },
    KeySpec {
        key: "CHATGATE_DATABASE_URL",
        kind: ValueKind::Url,
        default: Some("sqlite::memory:"),
        secret: true,
        required_in: SHARED_ENVS,
        required_when: None,
        parity: ParityRule::Present,
        description: "Thread store: sqlite://PATH (file), sqlite::memory: or postgres://... In staging and production it must be set explicitly.",
    },
    KeySpec {
        key: "CHATGATE_LLM_PROVIDER",
        kind: ValueKind::OneOf(LLM_PROVIDERS),
        default: Some("builtin"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Match,
        description: "builtin: a deterministic offline agent. openai: an OpenAI-compatible chat-completions API (needs CHATGATE_LLM_API_KEY).",
    },
    KeySpec {
        key: "CHATGATE_LLM_API_KEY",
        kind: ValueKind::Text,
        default: None,
        secret: true,
        required_in: ALL_ENVS,
        required_when: Some(("CHATGATE_LLM_PROVIDER", &["openai"])),
        parity: ParityRule::Present,
        description: "API key of the LLM provider. Without it the agent supervisor cannot run agents.",
    },
    KeySpec {
        key: "CHATGATE_LLM_BASE_URL",
        kind: ValueKind::Url,
        default: Some("https://api.openai.com/v1"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        description: "Base URL of the OpenAI-compatible API (…/v1).",
    },
    KeySpec {
        key: "CHATGATE_LLM_MODEL",
        kind: ValueKind::Text,
        default: Some("gpt-4o-mini"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        description: "Model name sent to the LLM provider.",
    },
    KeySpec {
        key: "CHATGATE_MAX_MESSAGE_BYTES",
        kind: ValueKind::Integer {
            min: 256,
            max: 16 * 1024 * 1024,
        },
        default: Some("65536"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        description: "Largest WebSocket message accepted; larger ones close the socket with 1009.",
    },
    KeySpec {
        key: "CHATGATE_MAX_CONNECTIONS",
        kind: ValueKind::Integer {
            min: 1,
            max: 1_000_000,
        },
        default: Some("20000"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        description: "Open WebSockets per process; beyond it new sockets are closed with 1013.",
    },
    KeySpec {
        key: "CHATGATE_MAX_CONNECTIONS_PER_USER",
        kind: ValueKind::Integer {
            min: 1,
            max: 10_000,
        },
        default: Some("16"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        description: "Open WebSockets per user; beyond it new sockets are closed with 1013.",
    },
    KeySpec {
        key: "CHATGATE_RUNS_PER_MINUTE",
        kind: ValueKind::Integer {
            min: 1,
            max: 100_000,
        },
        default: Some("30"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        description: "Agent runs a user may start per minute (pings are not limited).",
    },
    KeySpec {
        key: "CHATGATE_MAX_CONCURRENT_RUNS",
        kind: ValueKind::Integer {
            min: 1,
            max: 100_000,
        },
        default: Some("1024"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        description: "Agent runs one process executes at once; beyond it a message gets `error overloaded` and is not stored (send it again shortly).",
    },
    KeySpec {
        key: "CHATGATE_RUN_TIMEOUT_SECONDS",
        kind: ValueKind::Integer { min: 5, max: 3_600 },
        default: Some("300"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        description: "Longest an agent run may take from start to its last reply chunk; a slower one ends with `error run_timeout` (the message stays stored).",
    },
    KeySpec {
        key: "CHATGATE_MAX_REPLY_BYTES",
        kind: ValueKind::Integer {
            min: 1_024,
            max: 16 * 1024 * 1024,
        },
        default: Some("262144"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        description: "Largest reply an agent run may stream; a longer one ends with `error reply_too_large` and is not stored.",
    },
    KeySpec {
        key: "CHATGATE_HEADER_TIMEOUT_SECONDS",
        kind: ValueKind::Integer { min: 1, max: 120 },
        default: Some("10"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        description: "A new connection must send its first request's headers within this many seconds, or it is closed (at most 1024 connections wait for theirs at once).",
    },
    KeySpec {
        key: "CHATGATE_IDLE_TIMEOUT_SECONDS",
        kind: ValueKind::Integer {
            min: 5,
            max: 86_400,
        },
        default: Some("300"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        description: "A socket with no frame from the client for this long is closed.",
    },
    KeySpec {
        key: "CHATGATE_KEEPALIVE_SECONDS",
        kind: ValueKind::Integer { min: 1, max: 3_600 },
        default: Some("30"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        description: "Interval of server WebSocket pings that keep idle proxies from cutting the socket.",
    },
    KeySpec {
        key: "CHATGATE_SEND_QUEUE",
        kind: ValueKind::Integer {
            min: 1,
            max: 65_536,
        },
        default: Some("64"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        description: "Frames queued per socket; a client that lets it fill is disconnected (1013) instead of growing memory.",
    },
    KeySpec {
        key: "CHATGATE_SEND_TIMEOUT_SECONDS",
        kind: ValueKind::Integer { min: 1, max: 300 },
        default: Some("10"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        description: "A frame the client has not taken off the socket within this time means it stopped reading; it is disconnected.",
    },
    KeySpec {
        key: "CHATGATE_ALLOWED_ORIGINS",
        kind: ValueKind::List(None),
        default: None,
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        description: "Origins allowed to open /ws from a browser; empty allows any.",
    },
    KeySpec {
        key: "CHATGATE_DRAIN_SECONDS",
        kind: ValueKind::Integer { min: 0, max: 600 },
        default: Some("5"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        description: "After SIGTERM: seconds readiness reports 503 before open sockets get 1012.",
    },
    KeySpec {
        key: "CHATGATE_STARTUP_BUDGET_SECONDS",
        kind: ValueKind::Integer { min: 1, max: 3_600 },
        default: Some("60"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        description: "Time startup may spend waiting on dependencies before it gives up and exits.",
    },
    KeySpec {
        key: "CHATGATE_TERMINATION_LOG",
        kind: ValueKind::Path,
        default: Some("/dev/termination-log"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        description: "Where a failed startup writes its one-line reason (Kubernetes shows it in the pod status).",
    },
    KeySpec {
        key: "CHATGATE_LOG_FORMAT",
        kind: ValueKind::OneOf(&["text", "json"]),
        default: Some("text"),
        secret: false,
        required_in: &[],
        required_when: None,
        parity: ParityRule::Free,
        description: "text for people, json (severity, message, time) for log collectors.",
    },
];

/// The description of one key.
pub fn key_spec(key: &str) -> Option<&'static KeySpec> {
    KEYS.iter().find(|k| k.key == key)
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
            let text = explain(k.key).unwrap();
            assert!(text.contains(k.description));
            assert!(text.contains("parity:"));
        }
        assert!(explain("CHATGATE_NOPE").is_none());
    }
}
