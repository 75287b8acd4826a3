//! The service's configuration: read from `CHATGATE_*` variables and an optional
//! YAML file, validated with the contract's one schema, and turned into typed settings.
//!
//! Validation itself lives in `chatgate-contract` (the operator and the offline
//! `validate` run the same code); this module only gathers the values, decides which
//! critical service a bad key breaks, and parses the values the service uses.

use chatgate_contract::{
    ConfigSet, ConfigValue, CriticalService, Environment, KEYS, Origin, Problem, ProblemKind,
    TerminationMessage,
};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Reads the configuration file (a YAML map of `CHATGATE_*` keys) and overlays the
/// process environment on it: a variable set in the environment wins, so a pod's
/// env can override a file baked into an image.
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<ConfigSet, String> {
    let mut set = match file {
        Some(path) => read_file(path)?,
        None => ConfigSet::new(),
    };
    let env: Vec<(String, String)> = env.into_iter().collect();
    for (key, value) in ConfigSet::from_env_vars(env.iter().cloned()).values {
        set.values.insert(key, value);
    }
    // Cloud Run and Knative say which port to serve on in $PORT, on every interface;
    // an explicit CHATGATE_LISTEN (environment or file) still wins.
    if set.get("CHATGATE_LISTEN").is_none()
        && let Some((_, port)) = env.iter().find(|(k, _)| k == "PORT")
    {
        let port: u16 = port.trim().parse().map_err(|_| {
            format!(
                "PORT `{port}` is not a port number (1-65535); unset it or set CHATGATE_LISTEN to IP:PORT"
            )
        })?;
        set.set_literal("CHATGATE_LISTEN", format!("0.0.0.0:{port}"));
    }
    Ok(set)
}

fn read_file(path: &Path) -> Result<ConfigSet, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read the configuration file {}: {e}; check the --config path",
            path.display()
        )
    })?;
    parse_file(&text, &path.display().to_string())
}

/// The configuration file's text (`name` for messages) as a configuration. The fuzz
/// target `config` and its corpus replay call this; it must never panic.
pub fn parse_file(text: &str, name: &str) -> Result<ConfigSet, String> {
    let map: BTreeMap<String, serde_norway::Value> = if text.trim().is_empty() {
        BTreeMap::new()
    } else {
        serde_norway::from_str(text).map_err(|e| {
            format!("the configuration file {name} is not a YAML map of CHATGATE_* keys: {e}")
        })?
    };
    let mut set = ConfigSet::new();
    for (key, value) in map {
        // YAML turns `8080` or `true` into numbers and booleans; environment
        // variables are strings, so the file's scalars are read as their text.
        let text = match value {
            serde_norway::Value::String(s) => s,
            serde_norway::Value::Number(n) => n.to_string(),
            serde_norway::Value::Bool(b) => b.to_string(),
            serde_norway::Value::Null => String::new(),
            serde_norway::Value::Sequence(items) => items
                .iter()
                .map(|i| match i {
                    serde_norway::Value::String(s) => s.clone(),
                    other => serde_norway::to_string(other)
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            _ => {
                return Err(format!(
                    "{key} in {name} must be a scalar or a list, not a map"
                ));
            }
        };
        set.values.insert(key, ConfigValue::Literal(text));
    }
    Ok(set)
}

/// The critical service a configuration key feeds: a bad value for it means that
/// service cannot be built, which is what the termination line names.
///
/// Kept next to the typed settings so adding a key here is one edit; the test
/// `every_contract_key_belongs_to_a_service` fails for a key that is not listed.
pub fn service_of(key: &str) -> CriticalService {
    match key {
        "CHATGATE_JWT_ALGORITHM"
        | "CHATGATE_JWT_SECRET"
        | "CHATGATE_JWT_PUBLIC_KEY"
        | "CHATGATE_JWT_JWKS_FILE"
        | "CHATGATE_JWT_ISSUER"
        | "CHATGATE_JWT_AUDIENCE"
        | "CHATGATE_JWT_LEEWAY_SECONDS" => CriticalService::JwtVerifier,
        "CHATGATE_DATABASE_URL" => CriticalService::ThreadStore,
        "CHATGATE_LLM_PROVIDER"
        | "CHATGATE_LLM_API_KEY"
        | "CHATGATE_LLM_BASE_URL"
        | "CHATGATE_LLM_MODEL" => CriticalService::LlmClient,
        "CHATGATE_MAX_MESSAGE_BYTES"
        | "CHATGATE_MAX_CONNECTIONS"
        | "CHATGATE_MAX_CONNECTIONS_PER_USER"
        | "CHATGATE_IDLE_TIMEOUT_SECONDS"
        | "CHATGATE_KEEPALIVE_SECONDS"
        | "CHATGATE_SEND_QUEUE"
        | "CHATGATE_SEND_TIMEOUT_SECONDS"
        | "CHATGATE_ALLOWED_ORIGINS" => CriticalService::WsBridge,
        "CHATGATE_RUNS_PER_MINUTE"
        | "CHATGATE_MAX_CONCURRENT_RUNS"
        | "CHATGATE_RUN_TIMEOUT_SECONDS"
        | "CHATGATE_MAX_REPLY_BYTES" => CriticalService::AgentSupervisor,
        // Process-wide keys (environment, listen address, protocol, logging,
        // timing) and unknown keys break the configuration itself.
        _ => CriticalService::Configuration,
    }
}

/// Turns validation problems into the one termination line: it names the earliest
/// service (in startup order) a problem breaks, and lists every problem so one
/// restart is enough to see them all.
pub fn termination_for(problems: &[Problem]) -> TerminationMessage {
    let mut sorted: Vec<&Problem> = problems.iter().collect();
    sorted.sort_by_key(|p| service_of(&p.key).phase());
    let service = sorted
        .first()
        .map(|p| service_of(&p.key))
        .unwrap_or(CriticalService::Configuration);
    let cause = sorted
        .iter()
        .map(|p| format!("{} {}: {}", p.key, p.message, p.fix))
        .collect::<Vec<_>>()
        .join("; ");
    TerminationMessage::new(service.phase(), Some(service), cause)
}

/// Where a JWT verifier gets its key material.
#[derive(Debug, Clone)]
pub enum JwtKeySource {
    /// HS256 with this secret.
    Secret(String),
    /// HS256 in development without a configured secret: one is generated.
    GenerateDevSecret,
    /// RS256/ES256 with one PEM public key.
    PublicKeyPem(String),
    /// RS256/ES256 with the keys of a local JWKS file, chosen by `kid`.
    JwksFile(PathBuf),
}

#[derive(Debug, Clone)]
pub struct JwtSettings {
    /// `HS256`, `RS256` or `ES256` (validated by the contract).
    pub algorithm: String,
    pub key: JwtKeySource,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
}

#[derive(Debug, Clone)]
pub struct LlmSettings {
    pub provider: String,
    pub api_key: Option<String>,
    pub base_url: String,
    pub model: String,
}

/// Limits of the `/ws` bridge.
#[derive(Debug, Clone)]
pub struct BridgeSettings {
    pub max_message_bytes: usize,
    pub max_connections: usize,
    pub max_connections_per_user: u32,
    pub idle_timeout: Duration,
    pub keepalive: Duration,
    pub send_queue: usize,
    /// A send blocked this long means the client stopped reading.
    pub send_timeout: Duration,
    /// Empty: any origin (and requests without `Origin`, i.e. non-browsers).
    pub allowed_origins: Vec<String>,
}

/// Bounds on agent runs, each ending a run (or refusing one) with its own error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunLimits {
    /// Runs one process executes at once (`overloaded` beyond).
    pub max_concurrent: usize,
    /// From a run's start to its last reply chunk (`run_timeout`).
    pub timeout: Duration,
    /// Bytes of one streamed reply (`reply_too_large`).
    pub max_reply_bytes: usize,
}

impl Default for RunLimits {
    /// The configuration's defaults.
    fn default() -> Self {
        RunLimits {
            max_concurrent: 1024,
            timeout: Duration::from_secs(300),
            max_reply_bytes: 262_144,
        }
    }
}

/// The validated, typed configuration: the `configuration` critical service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub environment: Environment,
    pub listen: SocketAddr,
    pub critical_services: Vec<CriticalService>,
    pub jwt: JwtSettings,
    pub database_url: String,
    pub llm: LlmSettings,
    pub bridge: BridgeSettings,
    pub runs_per_minute: u32,
    pub run_limits: RunLimits,
    pub drain: Duration,
    pub startup_budget: Duration,
    /// Redacted key → value lines, for the startup log.
    pub redacted: Vec<(String, String)>,
}

impl ServiceConfig {
    /// Validates with the contract and parses; every problem comes back at once.
    pub fn from_set(set: &ConfigSet) -> Result<ServiceConfig, Vec<Problem>> {
        let problems = set.validate(Origin::Process);
        if !problems.is_empty() {
            return Err(problems);
        }
        let env = set.environment().map_err(|p| vec![p])?;
        let mut parse = Parser {
            set,
            env,
            problems: Vec::new(),
        };
        let config = ServiceConfig {
            environment: env,
            listen: parse.listen(),
            critical_services: parse
                .text("CHATGATE_CRITICAL_SERVICES")
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .filter_map(|s| s.parse().ok())
                .collect(),
            jwt: JwtSettings {
                algorithm: parse
                    .text("CHATGATE_JWT_ALGORITHM")
                    .unwrap_or_else(|| "HS256".into()),
                key: parse.jwt_key(),
                issuer: parse.text("CHATGATE_JWT_ISSUER"),
                audience: parse.text("CHATGATE_JWT_AUDIENCE"),
                leeway: Duration::from_secs(parse.value("CHATGATE_JWT_LEEWAY_SECONDS", 30)),
            },
            database_url: parse
                .text("CHATGATE_DATABASE_URL")
                .unwrap_or_else(|| "sqlite::memory:".into()),
            llm: LlmSettings {
                provider: parse
                    .text("CHATGATE_LLM_PROVIDER")
                    .unwrap_or_else(|| "builtin".into()),
                api_key: parse.text("CHATGATE_LLM_API_KEY"),
                base_url: parse
                    .text("CHATGATE_LLM_BASE_URL")
                    .unwrap_or_else(|| "https://api.openai.com/v1".into()),
                model: parse
                    .text("CHATGATE_LLM_MODEL")
                    .unwrap_or_else(|| "gpt-4o-mini".into()),
            },
            bridge: BridgeSettings {
                max_message_bytes: parse.value("CHATGATE_MAX_MESSAGE_BYTES", 65536),
                max_connections: parse.value("CHATGATE_MAX_CONNECTIONS", 20000),
                max_connections_per_user: parse.value("CHATGATE_MAX_CONNECTIONS_PER_USER", 16),
                idle_timeout: Duration::from_secs(
                    parse.value("CHATGATE_IDLE_TIMEOUT_SECONDS", 300),
                ),
                keepalive: Duration::from_secs(parse.value("CHATGATE_KEEPALIVE_SECONDS", 30)),
                send_queue: parse.value("CHATGATE_SEND_QUEUE", 64),
                send_timeout: Duration::from_secs(parse.value("CHATGATE_SEND_TIMEOUT_SECONDS", 10)),
                allowed_origins: parse
                    .text("CHATGATE_ALLOWED_ORIGINS")
                    .unwrap_or_default()
                    .split(',')
                    .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                    .filter(|o| !o.is_empty())
                    .collect(),
            },
            runs_per_minute: parse.value("CHATGATE_RUNS_PER_MINUTE", 30),
            run_limits: RunLimits {
                max_concurrent: parse.value(
                    "CHATGATE_MAX_CONCURRENT_RUNS",
                    RunLimits::default().max_concurrent,
                ),
                timeout: Duration::from_secs(parse.value(
                    "CHATGATE_RUN_TIMEOUT_SECONDS",
                    RunLimits::default().timeout.as_secs(),
                )),
                max_reply_bytes: parse.value(
                    "CHATGATE_MAX_REPLY_BYTES",
                    RunLimits::default().max_reply_bytes,
                ),
            },
            drain: Duration::from_secs(parse.value("CHATGATE_DRAIN_SECONDS", 5)),
            startup_budget: Duration::from_secs(parse.value("CHATGATE_STARTUP_BUDGET_SECONDS", 60)),
            redacted: set.redacted(),
        };
        if parse.problems.is_empty() {
            Ok(config)
        } else {
            Err(parse.problems)
        }
    }

    pub fn requires(&self, service: CriticalService) -> bool {
        self.critical_services.contains(&service)
    }
}

/// Reads effective values after the contract accepted them. A value the contract
/// accepted but this code cannot parse is still reported as a problem, never a panic.
struct Parser<'a> {
    set: &'a ConfigSet,
    env: Environment,
    problems: Vec<Problem>,
}

impl Parser<'_> {
    fn text(&self, key: &str) -> Option<String> {
        self.set
            .effective(key)
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    }

    fn value<T: std::str::FromStr>(&mut self, key: &str, fallback: T) -> T {
        let Some(raw) = self.text(key) else {
            return fallback;
        };
        match raw.parse() {
            Ok(v) => v,
            Err(_) => {
                self.problems.push(Problem::new(
                    key,
                    self.env,
                    ProblemKind::Invalid,
                    format!("`{raw}` cannot be used"),
                    format!("see `chatgate-service --explain {key}`"),
                ));
                fallback
            }
        }
    }

    /// `host:port`; a host name (`localhost:8080`) is resolved once, here.
    fn listen(&mut self) -> SocketAddr {
        let fallback = SocketAddr::from(([127, 0, 0, 1], 8080));
        let Some(raw) = self.text("CHATGATE_LISTEN") else {
            return fallback;
        };
        if let Ok(addr) = raw.parse() {
            return addr;
        }
        match std::net::ToSocketAddrs::to_socket_addrs(raw.as_str()).map(|mut a| a.next()) {
            Ok(Some(addr)) => addr,
            _ => {
                self.problems.push(Problem::new(
                    "CHATGATE_LISTEN",
                    self.env,
                    ProblemKind::Invalid,
                    format!("`{raw}` is not an address this host can listen on"),
                    "use IP:PORT, e.g. 127.0.0.1:8080 or 0.0.0.0:8080",
                ));
                fallback
            }
        }
    }

    fn jwt_key(&self) -> JwtKeySource {
        let alg = self.text("CHATGATE_JWT_ALGORITHM");
        if alg.as_deref().unwrap_or("HS256") == "HS256" {
            return match self.text("CHATGATE_JWT_SECRET") {
                Some(secret) => JwtKeySource::Secret(secret),
                None => JwtKeySource::GenerateDevSecret,
            };
        }
        match (
            self.text("CHATGATE_JWT_PUBLIC_KEY"),
            self.text("CHATGATE_JWT_JWKS_FILE"),
        ) {
            (Some(pem), _) => JwtKeySource::PublicKeyPem(pem),
            (None, Some(path)) => JwtKeySource::JwksFile(PathBuf::from(path)),
            // The contract reports this combination; keep a value that fails in
            // the auth phase with the key's name should validation ever change.
            (None, None) => JwtKeySource::PublicKeyPem(String::new()),
        }
    }
}

/// Every key the contract knows, for `--explain` without an argument.
pub fn all_keys() -> impl Iterator<Item = &'static str> {
    KEYS.iter().map(|k| k.key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_key_belongs_to_a_service() {
        let process_wide = [
            "CHATGATE_ENV",
            "CHATGATE_LISTEN",
            "CHATGATE_HEADER_TIMEOUT_SECONDS",
            "CHATGATE_PROTOCOL_VERSION",
            "CHATGATE_CRITICAL_SERVICES",
            "CHATGATE_DRAIN_SECONDS",
            "CHATGATE_STARTUP_BUDGET_SECONDS",
            "CHATGATE_TERMINATION_LOG",
            "CHATGATE_LOG_FORMAT",
        ];
        for spec in KEYS {
            let service = service_of(spec.key);
            assert!(
                service != CriticalService::Configuration || process_wide.contains(&spec.key),
                "{} falls through to `configuration`; list it in service_of",
                spec.key
            );
        }
    }

    #[test]
    fn defaults_give_a_complete_development_configuration() {
        let config = ServiceConfig::from_set(&ConfigSet::new()).unwrap();
        assert_eq!(config.environment, Environment::Development);
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.critical_services.len(), CriticalService::ALL.len());
        assert!(matches!(config.jwt.key, JwtKeySource::GenerateDevSecret));
        assert!(config.bridge.max_connections >= 10_000);
    }

    #[test]
    fn staging_openai_without_key_names_the_llm_client() {
        let mut set = ConfigSet::new();
        set.set_literal("CHATGATE_ENV", "staging")
            .set_literal("CHATGATE_JWT_SECRET", "0123456789abcdef0123456789abcdef")
            .set_literal("CHATGATE_JWT_ISSUER", "https://issuer")
            .set_literal("CHATGATE_JWT_AUDIENCE", "chat")
            .set_literal("CHATGATE_DATABASE_URL", "postgres://chat@db:5432/chat")
            .set_literal("CHATGATE_LLM_PROVIDER", "openai");
        let problems = ServiceConfig::from_set(&set).unwrap_err();
        let line = termination_for(&problems).to_string();
        assert!(
            line.starts_with(
                "phase=llm service=llm_client: CHATGATE_LLM_API_KEY is required in staging"
            ),
            "{line}"
        );
    }

    #[test]
    fn the_file_is_overridden_by_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            "CHATGATE_LISTEN: 127.0.0.1:9000\nCHATGATE_MAX_CONNECTIONS: 5\nCHATGATE_ALLOWED_ORIGINS: [https://a, https://b]\n",
        )
        .unwrap();
        let set = load(
            Some(&path),
            [("CHATGATE_MAX_CONNECTIONS".to_string(), "7".to_string())],
        )
        .unwrap();
        let config = ServiceConfig::from_set(&set).unwrap();
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.bridge.max_connections, 7);
        assert_eq!(config.bridge.allowed_origins, ["https://a", "https://b"]);
    }

    #[test]
    fn port_is_the_listen_address_when_chatgate_listen_is_unset() {
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let set = load(None, env(&[("PORT", "9123")])).unwrap();
        let config = ServiceConfig::from_set(&set).unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:9123");
        let set = load(
            None,
            env(&[("PORT", "9123"), ("CHATGATE_LISTEN", "127.0.0.1:7000")]),
        )
        .unwrap();
        assert_eq!(set.effective("CHATGATE_LISTEN"), Some("127.0.0.1:7000"));
        let err = load(None, env(&[("PORT", "http")])).unwrap_err();
        assert!(err.starts_with("PORT `http` is not a port number"), "{err}");
    }

    #[test]
    fn a_broken_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "- a\n- b\n").unwrap();
        let err = load(Some(&path), []).unwrap_err();
        assert!(err.contains("c.yaml"), "{err}");
    }
}
