//! The configuration schema of the service, its validation and its parity rules.
//!
//! Every key is described once in [`KEYS`]. The service validates its process
//! environment with it at startup, the operator validates the configuration it is
//! about to roll out, and `chatgate-operator validate` checks manifests offline —
//! all through [`ConfigSet::validate`] and [`ConfigSet::parity_with`], so a key added
//! here is checked in all three places at once.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

/// Prefix every service configuration key carries (they are environment variables).
pub const KEY_PREFIX: &str = "CHATGATE_";

/// The environment a configuration is meant for.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    JsonSchema,
    Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    #[default]
    Development,
    Staging,
    Production,
}

impl Environment {
    pub const ALL: [Environment; 3] = [
        Environment::Development,
        Environment::Staging,
        Environment::Production,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Development => "development",
            Environment::Staging => "staging",
            Environment::Production => "production",
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Environment {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Environment::ALL
            .into_iter()
            .find(|e| e.as_str() == s.trim())
            .ok_or_else(|| {
                format!("`{s}` is not an environment (use development, staging or production)")
            })
    }
}

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

/// The type of a key's value, checked on literals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    Text,
    /// An absolute URL or a database DSN (`scheme:...`).
    Url,
    Integer {
        min: i64,
        max: i64,
    },
    OneOf(&'static [&'static str]),
    /// Comma-separated list; `Some` restricts the items.
    List(Option<&'static [&'static str]>),
    SocketAddr,
    Path,
}

impl ValueKind {
    fn describe(self) -> String {
        match self {
            ValueKind::Text => "text".into(),
            ValueKind::Url => "a URL (scheme:...)".into(),
            ValueKind::Integer { min, max } => format!("an integer from {min} to {max}"),
            ValueKind::OneOf(v) => format!("one of {}", v.join(", ")),
            ValueKind::List(Some(v)) => format!("a comma-separated list of {}", v.join(", ")),
            ValueKind::List(None) => "a comma-separated list".into(),
            ValueKind::SocketAddr => "host:port".into(),
            ValueKind::Path => "a file path".into(),
        }
    }

    /// Checks a literal; the error says what was expected. The value is quoted in the
    /// error only when `shown` is [`Shown::Quoted`]: a secret key's value must never reach
    /// a message, because messages travel to logs, health reports and object status.
    fn check(self, value: &str, shown: Shown) -> Result<(), String> {
        let v = value.trim();
        let expected = || match shown {
            Shown::Quoted => format!("`{}` is not {}", shorten(value), self.describe()),
            Shown::Withheld => format!(
                "is not {}{} (the value is secret and not shown)",
                self.describe(),
                secret_flaw(value)
            ),
        };
        match self {
            ValueKind::Text | ValueKind::Path => {
                if v.is_empty() {
                    return Err("is empty".into());
                }
            }
            ValueKind::Url => {
                let ok = url_scheme(v).is_some_and(|scheme| v.len() > scheme.len() + 1);
                if !ok {
                    return Err(expected());
                }
            }
            ValueKind::Integer { min, max } => match v.parse::<i64>() {
                Ok(n) if (min..=max).contains(&n) => {}
                _ => return Err(expected()),
            },
            ValueKind::OneOf(allowed) => {
                if !allowed.contains(&v) {
                    return Err(expected());
                }
            }
            ValueKind::List(allowed) => {
                for item in split_list(v) {
                    if let Some(allowed) = allowed
                        && !allowed.contains(&item)
                    {
                        return Err(match shown {
                            Shown::Quoted => {
                                format!("`{}` is not one of {}", shorten(item), allowed.join(", "))
                            }
                            Shown::Withheld => format!(
                                "has an item that is not one of {} (the value is secret and not shown)",
                                allowed.join(", ")
                            ),
                        });
                    }
                }
            }
            ValueKind::SocketAddr => {
                let ok = v
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
                if !ok {
                    return Err(expected());
                }
            }
        }
        Ok(())
    }

    /// A canonical form for comparisons: lists compare as sets.
    fn normalize(self, value: &str) -> String {
        match self {
            ValueKind::List(_) => {
                let set: BTreeSet<&str> = split_list(value).collect();
                set.into_iter().collect::<Vec<_>>().join(",")
            }
            _ => value.trim().to_string(),
        }
    }
}

/// The scheme of a URL or DSN (`postgres` of `postgres://…`), if `value` has one.
/// A scheme is not secret, so it may be read from a Secret's value and shown.
pub fn url_scheme(value: &str) -> Option<&str> {
    let (scheme, _) = value.trim().split_once(':')?;
    (!scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)))
    .then_some(scheme)
}

/// The key that chooses the thread store.
pub const DATABASE_URL: &str = "CHATGATE_DATABASE_URL";

/// Outside development a ChatService runs several replicas, which must share one
/// database: SQLite keeps each pod's threads inside that pod. Checked wherever the
/// URL's scheme is known — the service's own environment, a manifest's literal, or
/// the Secret the operator and `validate` read.
pub fn shared_database_problem(env: Environment, scheme: &str) -> Option<Problem> {
    if env == Environment::Development || !scheme.eq_ignore_ascii_case("sqlite") {
        return None;
    }
    Some(Problem::new(
        DATABASE_URL,
        env,
        ProblemKind::Invalid,
        format!(
            "uses SQLite, which keeps each pod's threads inside that pod; {env} runs two or more replicas that must share one database"
        ),
        "point it at PostgreSQL (postgres://USER:PASSWORD@HOST:PORT/DATABASE), the database every replica shares; SQLite is for development",
    ))
}

fn split_list(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Whether a check may quote the value it rejects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shown {
    Quoted,
    /// The key is secret: say what is wrong with the value without any of its characters.
    Withheld,
}

/// What is visibly wrong with a secret value, described by shape only (never by its
/// characters), so the owner can fix it without the message leaking it.
fn secret_flaw(value: &str) -> &'static str {
    let t = value.trim();
    let quoted = t.len() >= 2
        && ((t.starts_with('"') && t.ends_with('"')) || (t.starts_with('\'') && t.ends_with('\'')));
    if quoted {
        "; it is wrapped in quotes — remove them"
    } else if t.starts_with(['"', '\'']) || t.ends_with(['"', '\'']) {
        "; it starts or ends with a quote — remove it"
    } else if t.chars().any(char::is_whitespace) {
        "; it contains whitespace — remove it"
    } else {
        ""
    }
}

fn shorten(v: &str) -> String {
    let mut s: String = v.chars().take(60).collect();
    if v.chars().count() > 60 {
        s.push('…');
    }
    s
}

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

/// Where a key's value comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ConfigValue {
    /// The value itself.
    Literal(String),
    /// A key of a Kubernetes Secret (resolved by the kubelet into the env var).
    SecretRef { secret: String, key: String },
}

/// Where a configuration was read from, which changes what is acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A process environment: secrets arrive as plain values.
    Process,
    /// A manifest (ChatService): secrets must be Secret references outside development.
    Manifest,
}

/// What kind of problem a [`Problem`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// Required in this environment and not set.
    Required,
    /// Set, but not a valid value.
    Invalid,
    /// Not a key chatgate knows.
    Unknown,
    /// A secret written inline in a manifest outside development.
    SecretInline,
    /// Differs from the production baseline under the `match` rule.
    ParityMatch,
    /// Set on one side only under the `present` rule.
    ParityPresent,
    /// The production baseline could not be found.
    BaselineMissing,
    /// A referenced Secret or key does not exist.
    MissingReference,
    /// Valid on Kubernetes, but beyond what the deploy target (Cloud Run, Knative) can do.
    Platform,
}

impl ProblemKind {
    /// The rule column of tables.
    pub fn rule(self) -> &'static str {
        match self {
            ProblemKind::Required => "required",
            ProblemKind::Invalid => "type",
            ProblemKind::Unknown => "unknown-key",
            ProblemKind::SecretInline => "secret",
            ProblemKind::ParityMatch => "parity:match",
            ProblemKind::ParityPresent => "parity:present",
            ProblemKind::BaselineMissing => "baseline",
            ProblemKind::MissingReference => "reference",
            ProblemKind::Platform => "platform",
        }
    }

    pub fn is_parity(self) -> bool {
        matches!(
            self,
            ProblemKind::ParityMatch | ProblemKind::ParityPresent | ProblemKind::BaselineMissing
        )
    }
}

/// One thing wrong with a configuration: which key, in which environment, under
/// which rule, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub key: String,
    pub environment: Environment,
    pub kind: ProblemKind,
    pub message: String,
    pub fix: String,
}

impl Problem {
    pub fn new(
        key: impl Into<String>,
        environment: Environment,
        kind: ProblemKind,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Problem {
            key: key.into(),
            environment,
            kind,
            message: message.into(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}, {}): {}; {}",
            self.key,
            self.environment,
            self.kind.rule(),
            self.message,
            self.fix
        )
    }
}

/// Which keys a non-production configuration may let differ from production.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParityPolicy {
    pub allowed_differences: BTreeSet<String>,
}

/// A configuration: key → where its value comes from. Keys are the `CHATGATE_*`
/// names; absent keys take their defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSet {
    pub values: BTreeMap<String, ConfigValue>,
}

impl ConfigSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads every `CHATGATE_*` variable (unknown ones too, so they are reported).
    pub fn from_env_vars<I, K, V>(vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut set = ConfigSet::new();
        for (k, v) in vars {
            let k = k.into();
            if k.starts_with(KEY_PREFIX) {
                set.values.insert(k, ConfigValue::Literal(v.into()));
            }
        }
        set
    }

    pub fn set(&mut self, key: impl Into<String>, value: ConfigValue) -> &mut Self {
        self.values.insert(key.into(), value);
        self
    }

    pub fn set_literal(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.set(key, ConfigValue::Literal(value.into()))
    }

    pub fn get(&self, key: &str) -> Option<&ConfigValue> {
        self.values.get(key)
    }

    /// The literal value, or the schema default when unset. `None` for unset keys
    /// without a default and for Secret references (whose value is not known here).
    pub fn effective(&self, key: &str) -> Option<&str> {
        match self.values.get(key) {
            Some(ConfigValue::Literal(v)) => Some(v.as_str()),
            Some(ConfigValue::SecretRef { .. }) => None,
            None => key_spec(key).and_then(|k| k.default),
        }
    }

    /// Whether the key is set explicitly (literal or reference). Defaults do not
    /// count: "required" and "present" are about what an environment declares.
    fn has_value(&self, spec: &KeySpec) -> bool {
        match self.values.get(spec.key) {
            Some(ConfigValue::Literal(v)) => !v.trim().is_empty(),
            Some(ConfigValue::SecretRef { .. }) => true,
            None => false,
        }
    }

    /// The environment the configuration declares (`CHATGATE_ENV`).
    pub fn environment(&self) -> Result<Environment, Problem> {
        let raw = self.effective("CHATGATE_ENV").unwrap_or("development");
        raw.parse().map_err(|e: String| {
            Problem::new(
                "CHATGATE_ENV",
                Environment::Development,
                ProblemKind::Invalid,
                e,
                "set CHATGATE_ENV to development, staging or production",
            )
        })
    }

    /// Every Secret reference, as (key, secret name, secret key).
    pub fn secret_refs(&self) -> impl Iterator<Item = (&str, &str, &str)> {
        self.values.iter().filter_map(|(k, v)| match v {
            ConfigValue::SecretRef { secret, key } => {
                Some((k.as_str(), secret.as_str(), key.as_str()))
            }
            ConfigValue::Literal(_) => None,
        })
    }

    /// Checks every key at once and returns every problem found (empty = valid).
    pub fn validate(&self, origin: Origin) -> Vec<Problem> {
        let mut problems = Vec::new();
        let env = match self.environment() {
            Ok(env) => env,
            Err(p) => {
                problems.push(p);
                Environment::Development
            }
        };

        for key in self.values.keys() {
            if key_spec(key).is_none() {
                let hint = closest_key(key)
                    .map(|k| format!("did you mean {k}? Run `--explain {k}`"))
                    .unwrap_or_else(|| "remove it; `--explain` lists the known keys".into());
                problems.push(Problem::new(
                    key,
                    env,
                    ProblemKind::Unknown,
                    "is not a chatgate configuration key",
                    hint,
                ));
            }
        }

        for spec in KEYS {
            let value = self.values.get(spec.key);
            match value {
                Some(ConfigValue::Literal(v)) => {
                    let shown = if spec.secret {
                        Shown::Withheld
                    } else {
                        Shown::Quoted
                    };
                    if let Err(e) = spec.kind.check(v, shown) {
                        problems.push(Problem::new(
                            spec.key,
                            env,
                            ProblemKind::Invalid,
                            e,
                            format!("set it to {}", spec.kind.describe()),
                        ));
                    } else if spec.secret
                        && origin == Origin::Manifest
                        && env != Environment::Development
                    {
                        problems.push(Problem::new(
                            spec.key,
                            env,
                            ProblemKind::SecretInline,
                            "is a secret written inline in the manifest",
                            "put it in a Secret and reference it",
                        ));
                    }
                }
                Some(ConfigValue::SecretRef { secret, key })
                    if secret.trim().is_empty() || key.trim().is_empty() =>
                {
                    problems.push(Problem::new(
                        spec.key,
                        env,
                        ProblemKind::Invalid,
                        "Secret reference needs both a Secret name and a key",
                        "set the Secret's name and key",
                    ));
                }
                Some(ConfigValue::SecretRef { .. }) | None => {}
            }
            if self.is_required(spec, env) && !self.has_value(spec) {
                let reason = match spec.required_when {
                    Some((other, _)) => format!(
                        "is required in {env} when {other} is {}",
                        self.effective(other).unwrap_or("set")
                    ),
                    None => format!("is required in {env}"),
                };
                let fix = if spec.secret {
                    "reference a Secret key that holds it".to_string()
                } else {
                    "set it".to_string()
                };
                problems.push(Problem::new(
                    spec.key,
                    env,
                    ProblemKind::Required,
                    reason,
                    fix,
                ));
            }
        }

        self.cross_key_checks(env, &mut problems);
        problems
    }

    fn is_required(&self, spec: &KeySpec, env: Environment) -> bool {
        if !spec.required_in.contains(&env) {
            return false;
        }
        match spec.required_when {
            None => true,
            Some((other, values)) => self
                .effective(other)
                .is_some_and(|v| values.contains(&v.trim())),
        }
    }

    fn cross_key_checks(&self, env: Environment, problems: &mut Vec<Problem>) {
        if let Some(ConfigValue::Literal(url)) = self.values.get(DATABASE_URL)
            && let Some(problem) = url_scheme(url).and_then(|s| shared_database_problem(env, s))
        {
            problems.push(problem);
        }
        let alg = self
            .effective("CHATGATE_JWT_ALGORITHM")
            .unwrap_or("HS256")
            .trim();
        if matches!(alg, "RS256" | "ES256") {
            let has = |k: &str| self.values.contains_key(k);
            if !has("CHATGATE_JWT_PUBLIC_KEY") && !has("CHATGATE_JWT_JWKS_FILE") {
                problems.push(Problem::new(
                    "CHATGATE_JWT_PUBLIC_KEY",
                    env,
                    ProblemKind::Required,
                    format!("is required when CHATGATE_JWT_ALGORITHM is {alg} (or CHATGATE_JWT_JWKS_FILE)"),
                    "set a PEM public key or a JWKS file path",
                ));
            }
        }
        if alg == "HS256"
            && env != Environment::Development
            && let Some(ConfigValue::Literal(secret)) = self.values.get("CHATGATE_JWT_SECRET")
            && !secret.trim().is_empty()
            && secret.len() < 32
        {
            problems.push(Problem::new(
                "CHATGATE_JWT_SECRET",
                env,
                ProblemKind::Invalid,
                format!(
                    "is {} bytes; HS256 needs at least 32 in {env}",
                    secret.len()
                ),
                "use a longer random secret (e.g. `openssl rand -base64 48`)",
            ));
        }
    }

    /// Compares this (non-production) configuration with its production baseline
    /// key by key and returns every difference the rules forbid.
    pub fn parity_with(&self, baseline: &ConfigSet, policy: &ParityPolicy) -> Vec<Problem> {
        let env = self.environment().unwrap_or_default();
        let mut problems = Vec::new();
        for allowed in &policy.allowed_differences {
            if key_spec(allowed).is_none() {
                problems.push(Problem::new(
                    allowed,
                    env,
                    ProblemKind::Unknown,
                    "is listed as allowed to differ but is not a chatgate configuration key",
                    "remove it from the allowed differences",
                ));
            }
        }
        for spec in KEYS {
            if policy.allowed_differences.contains(spec.key) {
                continue;
            }
            match spec.parity {
                ParityRule::Free => {}
                ParityRule::Present => match (self.has_value(spec), baseline.has_value(spec)) {
                    (false, true) => problems.push(Problem::new(
                        spec.key,
                        env,
                        ProblemKind::ParityPresent,
                        format!("is set in production but missing in {env}"),
                        format!("set it in {env} (values may differ), or allow it to differ"),
                    )),
                    (true, false) => problems.push(Problem::new(
                        spec.key,
                        env,
                        ProblemKind::ParityPresent,
                        format!("is set in {env} but missing in production"),
                        "set it in production too, or allow it to differ",
                    )),
                    _ => {}
                },
                ParityRule::Match => {
                    let mine = self.comparable(spec);
                    let theirs = baseline.comparable(spec);
                    if mine != theirs {
                        let show =
                            |v: &Option<String>| v.clone().unwrap_or_else(|| "(unset)".into());
                        problems.push(Problem::new(
                            spec.key,
                            env,
                            ProblemKind::ParityMatch,
                            format!(
                                "is `{}` in {env} but `{}` in production",
                                show(&mine),
                                show(&theirs)
                            ),
                            "make it equal to production, or allow it to differ",
                        ));
                    }
                }
            }
        }
        problems
    }

    /// The value compared under `match`: normalised literal or default; a Secret
    /// reference compares by where it points.
    fn comparable(&self, spec: &KeySpec) -> Option<String> {
        match self.values.get(spec.key) {
            Some(ConfigValue::Literal(v)) => Some(spec.kind.normalize(v)),
            Some(ConfigValue::SecretRef { secret, key }) => Some(format!("secret:{secret}/{key}")),
            None => spec.default.map(|d| spec.kind.normalize(d)),
        }
    }

    /// Key → value for display, secrets redacted.
    pub fn redacted(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for spec in KEYS {
            let shown = match self.values.get(spec.key) {
                Some(ConfigValue::SecretRef { secret, key }) => {
                    format!("<from Secret {secret}/{key}>")
                }
                Some(ConfigValue::Literal(_)) if spec.secret => "<redacted>".to_string(),
                Some(ConfigValue::Literal(v)) => v.clone(),
                None => match spec.default {
                    Some(d) => format!("{d} (default)"),
                    None => "(unset)".to_string(),
                },
            };
            out.push((spec.key.to_string(), shown));
        }
        out
    }
}

/// The known key nearest to a misspelt one, for "did you mean".
fn closest_key(unknown: &str) -> Option<&'static str> {
    closest(unknown, KEYS.iter().map(|k| k.key))
}

/// The candidate nearest to a misspelt word (at most three edits away), for "did you
/// mean" hints on keys and on manifest field names alike.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn staging() -> ConfigSet {
        let mut c = ConfigSet::new();
        c.set_literal("CHATGATE_ENV", "staging")
            .set_literal("CHATGATE_JWT_ISSUER", "https://auth.example.com/")
            .set_literal("CHATGATE_JWT_AUDIENCE", "chat-staging")
            .set(
                "CHATGATE_JWT_SECRET",
                ConfigValue::SecretRef {
                    secret: "jwt".into(),
                    key: "secret".into(),
                },
            )
            .set(
                "CHATGATE_DATABASE_URL",
                ConfigValue::SecretRef {
                    secret: "db".into(),
                    key: "url".into(),
                },
            );
        c
    }

    fn production() -> ConfigSet {
        let mut c = staging();
        c.set_literal("CHATGATE_ENV", "production")
            .set_literal("CHATGATE_JWT_AUDIENCE", "chat");
        c
    }

    #[test]
    fn sqlite_outside_development_is_refused_by_scheme_alone() {
        for env in [Environment::Staging, Environment::Production] {
            let problem = shared_database_problem(env, "sqlite").expect("refused");
            assert_eq!(problem.key, DATABASE_URL);
            assert!(problem.fix.contains("PostgreSQL"), "{problem}");
            assert!(shared_database_problem(env, "postgres").is_none());
            assert!(shared_database_problem(env, "postgresql").is_none());
        }
        assert!(shared_database_problem(Environment::Development, "sqlite").is_none());

        let mut set = staging();
        set.set_literal(DATABASE_URL, "sqlite:///data/pw-in-path.db");
        let problems = set.validate(Origin::Process);
        let problem = problems
            .iter()
            .find(|p| p.key == DATABASE_URL)
            .expect("the database key is named");
        assert!(!problem.to_string().contains("pw-in-path"), "{problem}");
        assert_eq!(url_scheme(" postgres://u:p@h/db"), Some("postgres"));
        assert_eq!(url_scheme("no scheme here"), None);
    }

    #[test]
    fn defaults_are_valid_in_development() {
        assert_eq!(ConfigSet::new().validate(Origin::Process), vec![]);
        assert_eq!(ConfigSet::new().validate(Origin::Manifest), vec![]);
    }

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
    fn staging_without_secrets_reports_every_missing_key_at_once() {
        let mut c = ConfigSet::new();
        c.set_literal("CHATGATE_ENV", "staging");
        let keys: BTreeSet<_> = c
            .validate(Origin::Process)
            .into_iter()
            .map(|p| p.key)
            .collect();
        for k in [
            "CHATGATE_JWT_SECRET",
            "CHATGATE_JWT_ISSUER",
            "CHATGATE_JWT_AUDIENCE",
            "CHATGATE_DATABASE_URL",
        ] {
            assert!(keys.contains(k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn openai_without_key_names_the_key_in_every_environment() {
        for env in Environment::ALL {
            let mut c = if env == Environment::Development {
                ConfigSet::new()
            } else {
                staging()
            };
            c.set_literal("CHATGATE_ENV", env.as_str())
                .set_literal("CHATGATE_LLM_PROVIDER", "openai");
            let problems = c.validate(Origin::Process);
            assert!(
                problems
                    .iter()
                    .any(|p| p.key == "CHATGATE_LLM_API_KEY" && p.kind == ProblemKind::Required),
                "{env}: {problems:?}"
            );
        }
    }

    #[test]
    fn unknown_key_is_reported_with_a_suggestion() {
        let mut c = ConfigSet::new();
        c.set_literal("CHATGATE_JWT_ISUER", "x");
        let p = c.validate(Origin::Process);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].kind, ProblemKind::Unknown);
        assert!(p[0].fix.contains("CHATGATE_JWT_ISSUER"), "{}", p[0].fix);
    }

    #[test]
    fn inline_secret_in_a_staging_manifest_is_refused() {
        let mut c = staging();
        c.set_literal("CHATGATE_JWT_SECRET", "0123456789abcdef0123456789abcdef");
        assert!(
            c.validate(Origin::Manifest)
                .iter()
                .any(|p| p.kind == ProblemKind::SecretInline)
        );
        assert!(c.validate(Origin::Process).is_empty());
    }

    #[test]
    fn short_hs256_secret_is_refused_outside_development() {
        let mut c = staging();
        c.set_literal("CHATGATE_JWT_SECRET", "short");
        let p = c.validate(Origin::Process);
        assert!(
            p.iter()
                .any(|p| p.key == "CHATGATE_JWT_SECRET" && p.kind == ProblemKind::Invalid),
            "{p:?}"
        );
    }

    #[test]
    fn rs256_needs_a_public_key() {
        let mut c = ConfigSet::new();
        c.set_literal("CHATGATE_JWT_ALGORITHM", "RS256");
        assert!(
            c.validate(Origin::Process)
                .iter()
                .any(|p| p.key == "CHATGATE_JWT_PUBLIC_KEY")
        );
        c.set_literal("CHATGATE_JWT_JWKS_FILE", "/etc/jwks.json");
        assert!(c.validate(Origin::Process).is_empty());
    }

    #[test]
    fn seed_scenario_staging_missing_llm_key_is_a_present_violation() {
        let mut prod = production();
        prod.set_literal("CHATGATE_LLM_PROVIDER", "openai").set(
            "CHATGATE_LLM_API_KEY",
            ConfigValue::SecretRef {
                secret: "llm".into(),
                key: "api-key".into(),
            },
        );
        let mut stg = staging();
        stg.set_literal("CHATGATE_LLM_PROVIDER", "openai");
        let p = stg.parity_with(&prod, &ParityPolicy::default());
        assert!(
            p.iter()
                .any(|p| p.key == "CHATGATE_LLM_API_KEY" && p.kind == ProblemKind::ParityPresent),
            "{p:?}"
        );
        assert!(
            stg.validate(Origin::Manifest)
                .iter()
                .any(|p| p.key == "CHATGATE_LLM_API_KEY")
        );
    }

    #[test]
    fn match_drift_is_reported_and_an_allowed_difference_is_not() {
        let prod = production();
        let mut stg = staging();
        stg.set_literal("CHATGATE_JWT_ALGORITHM", "ES256")
            .set_literal("CHATGATE_JWT_JWKS_FILE", "/k");
        let p = stg.parity_with(&prod, &ParityPolicy::default());
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "CHATGATE_JWT_ALGORITHM");
        assert_eq!(p[0].kind, ProblemKind::ParityMatch);
        let policy = ParityPolicy {
            allowed_differences: ["CHATGATE_JWT_ALGORITHM".to_string()].into(),
        };
        assert!(stg.parity_with(&prod, &policy).is_empty());
    }

    #[test]
    fn critical_service_lists_compare_as_sets() {
        let mut a = production();
        a.set_literal("CHATGATE_CRITICAL_SERVICES", "thread_store, configuration");
        let mut b = staging();
        b.set_literal("CHATGATE_CRITICAL_SERVICES", "configuration,thread_store");
        assert!(b.parity_with(&a, &ParityPolicy::default()).is_empty());
    }

    #[test]
    fn a_quoted_database_url_is_reported_without_its_password() {
        let quoted = "\"postgres://chat:Hunter2Secret@db:5432/chat\"";
        for origin in [Origin::Process, Origin::Manifest] {
            let mut c = ConfigSet::new();
            c.set_literal("CHATGATE_DATABASE_URL", quoted);
            let problems = c.validate(origin);
            let p = problems
                .iter()
                .find(|p| p.key == "CHATGATE_DATABASE_URL")
                .unwrap_or_else(|| panic!("{problems:?}"));
            let text = p.to_string();
            assert!(
                !text.contains("Hunter2Secret") && !text.contains("chat@db"),
                "{text}"
            );
            assert!(text.contains("wrapped in quotes — remove them"), "{text}");
        }
        // A non-secret key still shows its value, which helps find the typo.
        let mut c = ConfigSet::new();
        c.set_literal("CHATGATE_MAX_CONNECTIONS", "lots");
        assert!(
            c.validate(Origin::Process)[0]
                .to_string()
                .contains("`lots`")
        );
    }

    #[test]
    fn closest_suggests_a_near_candidate_only() {
        assert_eq!(closest("isuer", ["issuer", "audience"]), Some("issuer"));
        assert_eq!(closest("replicaCount", ["issuer", "audience"]), None);
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

    fn arbitrary_set() -> impl Strategy<Value = ConfigSet> {
        let key = prop_oneof![
            proptest::sample::select(KEYS.iter().map(|k| k.key.to_string()).collect::<Vec<_>>()),
            "CHATGATE_[A-Z_]{0,12}",
        ];
        let value = prop_oneof![
            ".{0,40}".prop_map(ConfigValue::Literal),
            proptest::sample::select(vec![
                "staging",
                "production",
                "development",
                "HS256",
                "RS256",
                "openai",
                "1"
            ])
            .prop_map(|s| ConfigValue::Literal(s.to_string())),
            ("[a-z]{0,5}", "[a-z]{0,5}")
                .prop_map(|(secret, key)| ConfigValue::SecretRef { secret, key }),
        ];
        proptest::collection::btree_map(key, value, 0..12).prop_map(|values| ConfigSet { values })
    }

    proptest! {
        #[test]
        fn validation_never_panics(set in arbitrary_set()) {
            let _ = set.validate(Origin::Manifest);
            let _ = set.validate(Origin::Process);
            let _ = set.redacted();
        }

        #[test]
        fn a_configuration_is_always_in_parity_with_itself(set in arbitrary_set()) {
            let problems = set.parity_with(&set, &ParityPolicy::default());
            prop_assert!(problems.is_empty(), "{:?}", problems);
        }

        #[test]
        fn no_message_ever_carries_a_secret_value(
            set in arbitrary_set(),
            env in proptest::sample::select(vec!["development", "staging", "production"]),
            secret in proptest::sample::select(
                KEYS.iter().filter(|k| k.secret).map(|k| k.key).collect::<Vec<_>>()),
            before in "[\"' a-z:/@]{0,8}",
            after in "[\"' a-z:/@.]{0,8}",
        ) {
            let mut set = set;
            set.set_literal("CHATGATE_ENV", env)
                .set_literal(secret, format!("{before}Zq9Hunter2{after}"));
            let baseline = production();
            for origin in [Origin::Manifest, Origin::Process] {
                let problems = set.validate(origin).into_iter()
                    .chain(set.parity_with(&baseline, &ParityPolicy::default()));
                for p in problems {
                    prop_assert!(!p.to_string().contains("Zq9Hunter2"), "{}", p);
                }
            }
        }

        #[test]
        fn parity_never_panics(a in arbitrary_set(), b in arbitrary_set()) {
            let _ = a.parity_with(&b, &ParityPolicy::default());
        }
    }
}
