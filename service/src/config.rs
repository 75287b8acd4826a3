//! The service's configuration: read from `CHATGATE_*` variables and an optional
//! YAML file, validated with the contract's one schema, and turned into typed settings.
//!
//! Validation itself lives in `chatgate-contract` (the operator and the offline
//! `validate` run the same code); this module only gathers the values, decides which
//! critical service a bad key breaks, and parses the values the service uses.

use chatgate_contract::{
    ConfigSet, ConfigValue, CriticalService, Environment, JwtAlgorithm, Key, LlmProvider, Origin,
    Problem, ProblemKind, TerminationMessage,
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
    if set.get(Key::Listen).is_none()
        && let Some((_, port)) = env.iter().find(|(k, _)| k == "PORT")
    {
        let port: u16 = port.trim().parse().map_err(|_| {
            format!(
                "PORT `{port}` is not a port number (1-65535); unset it or set CHATGATE_LISTEN to IP:PORT"
            )
        })?;
        set.set_literal(Key::Listen, format!("0.0.0.0:{port}"));
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
/// service cannot be built, which is what the termination line names. The contract's
/// key table says which (`KeySpec::feeds`); unknown keys break the configuration.
pub fn service_of(key: &str) -> CriticalService {
    Key::lookup(key).map_or(CriticalService::Configuration, Key::service)
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
    pub algorithm: JwtAlgorithm,
    pub key: JwtKeySource,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
}

#[derive(Debug, Clone)]
pub struct LlmSettings {
    pub provider: LlmProvider,
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
    /// The key table's defaults: the limits of a configuration that sets none.
    fn default() -> Self {
        let unset = ConfigSet::new();
        Parser {
            set: &unset,
            env: Environment::DEFAULT,
            problems: Vec::new(),
        }
        .run_limits()
    }
}

/// The validated, typed configuration: the `configuration` critical service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub environment: Environment,
    pub listen: SocketAddr,
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
        // Unset keys read as the key table's defaults (`ConfigSet::effective`), so no
        // default is repeated here.
        let config = ServiceConfig {
            environment: env,
            listen: parse.listen(),
            jwt: JwtSettings {
                algorithm: parse.value(Key::JwtAlgorithm),
                key: parse.jwt_key(),
                issuer: parse.text(Key::JwtIssuer),
                audience: parse.text(Key::JwtAudience),
                leeway: parse.seconds(Key::JwtLeewaySeconds),
            },
            database_url: parse.text(Key::DatabaseUrl).unwrap_or_default(),
            llm: LlmSettings {
                provider: parse.value(Key::LlmProvider),
                api_key: parse.text(Key::LlmApiKey),
                base_url: parse.text(Key::LlmBaseUrl).unwrap_or_default(),
                model: parse.text(Key::LlmModel).unwrap_or_default(),
            },
            bridge: BridgeSettings {
                max_message_bytes: parse.value(Key::MaxMessageBytes),
                max_connections: parse.value(Key::MaxConnections),
                max_connections_per_user: parse.value(Key::MaxConnectionsPerUser),
                idle_timeout: parse.seconds(Key::IdleTimeoutSeconds),
                keepalive: parse.seconds(Key::KeepaliveSeconds),
                send_queue: parse.value(Key::SendQueue),
                send_timeout: parse.seconds(Key::SendTimeoutSeconds),
                allowed_origins: parse
                    .text(Key::AllowedOrigins)
                    .unwrap_or_default()
                    .split(',')
                    .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                    .filter(|o| !o.is_empty())
                    .collect(),
            },
            runs_per_minute: parse.value(Key::RunsPerMinute),
            run_limits: parse.run_limits(),
            drain: parse.seconds(Key::DrainSeconds),
            startup_budget: parse.seconds(Key::StartupBudgetSeconds),
            redacted: set.redacted(),
        };
        if parse.problems.is_empty() {
            Ok(config)
        } else {
            Err(parse.problems)
        }
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
    fn text(&self, key: Key) -> Option<String> {
        self.set
            .effective(key)
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    }

    /// The key's effective value parsed as `T`. Every key read this way has a default
    /// in the key table; `T::default()` only stands in while a problem is reported.
    fn value<T: std::str::FromStr + Default>(&mut self, key: Key) -> T {
        let Some(raw) = self.text(key) else {
            return T::default();
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
                T::default()
            }
        }
    }

    fn seconds(&mut self, key: Key) -> Duration {
        Duration::from_secs(self.value(key))
    }

    fn run_limits(&mut self) -> RunLimits {
        RunLimits {
            max_concurrent: self.value(Key::MaxConcurrentRuns),
            timeout: self.seconds(Key::RunTimeoutSeconds),
            max_reply_bytes: self.value(Key::MaxReplyBytes),
        }
    }

    /// `host:port`; a host name (`localhost:8080`) is resolved once, here.
    fn listen(&mut self) -> SocketAddr {
        let fallback = SocketAddr::from(([127, 0, 0, 1], 8080));
        let Some(raw) = self.text(Key::Listen) else {
            return fallback;
        };
        if let Ok(addr) = raw.parse() {
            return addr;
        }
        match std::net::ToSocketAddrs::to_socket_addrs(raw.as_str()).map(|mut a| a.next()) {
            Ok(Some(addr)) => addr,
            _ => {
                self.problems.push(Problem::new(
                    Key::Listen,
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
        let algorithm: JwtAlgorithm = self
            .text(Key::JwtAlgorithm)
            .and_then(|a| a.parse().ok())
            .unwrap_or_default();
        if algorithm == JwtAlgorithm::HS256 {
            return match self.text(Key::JwtSecret) {
                Some(secret) => JwtKeySource::Secret(secret),
                None => JwtKeySource::GenerateDevSecret,
            };
        }
        match (self.text(Key::JwtPublicKey), self.text(Key::JwtJwksFile)) {
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
    Key::ALL.into_iter().map(Key::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_key_belongs_to_a_service() {
        // The contract lists the process-wide keys and checks every other key names
        // the service it feeds; here, that the service reads that classification.
        for key in Key::ALL {
            let expected = key.spec().feeds.unwrap_or(CriticalService::Configuration);
            assert_eq!(service_of(key.as_str()), expected, "{key}");
        }
        assert_eq!(service_of("CHATGATE_NOPE"), CriticalService::Configuration);
        assert_eq!(
            service_of("CHATGATE_DATABASE_URL"),
            CriticalService::ThreadStore
        );
    }

    #[test]
    fn run_limits_default_to_the_key_table() {
        let limits = RunLimits::default();
        assert_eq!(limits.max_concurrent, 1024);
        assert_eq!(limits.timeout, Duration::from_secs(300));
        assert_eq!(limits.max_reply_bytes, 262_144);
        let config = ServiceConfig::from_set(&ConfigSet::new()).unwrap();
        assert_eq!(config.run_limits, limits);
        assert_eq!(config.jwt.algorithm, JwtAlgorithm::HS256);
        assert_eq!(config.llm.provider, LlmProvider::Builtin);
        assert_eq!(config.database_url, "sqlite::memory:");
        assert_eq!(config.llm.base_url, "https://api.openai.com/v1");
        assert_eq!(config.llm.model, "gpt-4o-mini");
        assert_eq!(config.drain, Duration::from_secs(5));
    }

    #[test]
    fn defaults_give_a_complete_development_configuration() {
        let config = ServiceConfig::from_set(&ConfigSet::new()).unwrap();
        assert_eq!(config.environment, Environment::Development);
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert!(matches!(config.jwt.key, JwtKeySource::GenerateDevSecret));
        assert!(config.bridge.max_connections >= 10_000);
    }

    #[test]
    fn staging_openai_without_key_names_the_llm_client() {
        let mut set = ConfigSet::new();
        set.set_literal(Key::Env, "staging")
            .set_literal(Key::JwtSecret, "0123456789abcdef0123456789abcdef")
            .set_literal(Key::JwtIssuer, "https://issuer")
            .set_literal(Key::JwtAudience, "chat")
            .set_literal(Key::DatabaseUrl, "postgres://chat@db:5432/chat")
            .set_literal(Key::LlmProvider, "openai");
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
        assert_eq!(set.effective(Key::Listen), Some("127.0.0.1:7000"));
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
