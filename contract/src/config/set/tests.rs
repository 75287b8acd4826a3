//! Validation and parity of whole configurations.

use super::*;
use crate::config::value::url_scheme;
use proptest::prelude::*;

fn staging() -> ConfigSet {
    let mut c = ConfigSet::new();
    c.set_literal(Key::Env, "staging")
        .set_literal(Key::JwtIssuer, "https://auth.example.com/")
        .set_literal(Key::JwtAudience, "chat-staging")
        .set(
            Key::JwtSecret,
            ConfigValue::SecretRef {
                secret: "jwt".into(),
                key: "secret".into(),
            },
        )
        .set(
            Key::DatabaseUrl,
            ConfigValue::SecretRef {
                secret: "db".into(),
                key: "url".into(),
            },
        );
    c
}

fn production() -> ConfigSet {
    let mut c = staging();
    c.set_literal(Key::Env, "production")
        .set_literal(Key::JwtAudience, "chat");
    c
}

#[test]
fn sqlite_outside_development_is_refused_by_scheme_alone() {
    for env in [Environment::Staging, Environment::Production] {
        let problem = shared_database_problem(env, "sqlite").expect("refused");
        assert_eq!(problem.key, Key::DatabaseUrl);
        assert!(problem.fix.contains("PostgreSQL"), "{problem}");
        assert!(shared_database_problem(env, "postgres").is_none());
        assert!(shared_database_problem(env, "postgresql").is_none());
    }
    assert!(shared_database_problem(Environment::Development, "sqlite").is_none());

    let mut set = staging();
    set.set_literal(Key::DatabaseUrl, "sqlite:///data/pw-in-path.db");
    let problems = set.validate(Origin::Process);
    let problem = problems
        .iter()
        .find(|p| p.key == Key::DatabaseUrl)
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
fn staging_without_secrets_reports_every_missing_key_at_once() {
    let mut c = ConfigSet::new();
    c.set_literal(Key::Env, "staging");
    let keys: BTreeSet<_> = c
        .validate(Origin::Process)
        .into_iter()
        .map(|p| p.key)
        .collect();
    for k in [
        Key::JwtSecret,
        Key::JwtIssuer,
        Key::JwtAudience,
        Key::DatabaseUrl,
    ] {
        assert!(keys.contains(k.as_str()), "{k} missing from {keys:?}");
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
        c.set_literal(Key::Env, env.as_str())
            .set_literal(Key::LlmProvider, "openai");
        let problems = c.validate(Origin::Process);
        assert!(
            problems
                .iter()
                .any(|p| p.key == Key::LlmApiKey && p.kind == ProblemKind::Required),
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
    assert!(p[0].fix.contains(Key::JwtIssuer.as_str()), "{}", p[0].fix);
}

#[test]
fn inline_secret_in_a_staging_manifest_is_refused() {
    let mut c = staging();
    c.set_literal(Key::JwtSecret, "0123456789abcdef0123456789abcdef");
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
    c.set_literal(Key::JwtSecret, "short");
    let p = c.validate(Origin::Process);
    assert!(
        p.iter()
            .any(|p| p.key == Key::JwtSecret && p.kind == ProblemKind::Invalid),
        "{p:?}"
    );
}

#[test]
fn rs256_needs_a_public_key() {
    let mut c = ConfigSet::new();
    c.set_literal(Key::JwtAlgorithm, "RS256");
    assert!(
        c.validate(Origin::Process)
            .iter()
            .any(|p| p.key == Key::JwtPublicKey)
    );
    c.set_literal(Key::JwtJwksFile, "/etc/jwks.json");
    assert!(c.validate(Origin::Process).is_empty());
}

#[test]
fn seed_scenario_staging_missing_llm_key_is_a_present_violation() {
    let mut prod = production();
    prod.set_literal(Key::LlmProvider, "openai").set(
        Key::LlmApiKey,
        ConfigValue::SecretRef {
            secret: "llm".into(),
            key: "api-key".into(),
        },
    );
    let mut stg = staging();
    stg.set_literal(Key::LlmProvider, "openai");
    let p = stg.parity_with(&prod, &ParityPolicy::default());
    assert!(
        p.iter()
            .any(|p| p.key == Key::LlmApiKey && p.kind == ProblemKind::ParityPresent),
        "{p:?}"
    );
    assert!(
        stg.validate(Origin::Manifest)
            .iter()
            .any(|p| p.key == Key::LlmApiKey)
    );
}

#[test]
fn match_drift_is_reported_and_an_allowed_difference_is_not() {
    let prod = production();
    let mut stg = staging();
    stg.set_literal(Key::JwtAlgorithm, "ES256")
        .set_literal(Key::JwtJwksFile, "/k");
    let p = stg.parity_with(&prod, &ParityPolicy::default());
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].key, Key::JwtAlgorithm);
    assert_eq!(p[0].kind, ProblemKind::ParityMatch);
    let policy = ParityPolicy {
        allowed_differences: [Key::JwtAlgorithm.to_string()].into(),
    };
    assert!(stg.parity_with(&prod, &policy).is_empty());
}

#[test]
fn lists_compare_as_sets() {
    let list = crate::ValueKind::List(None);
    assert_eq!(
        list.normalize("https://b.example, https://a.example"),
        list.normalize("https://a.example,https://b.example,")
    );
}

#[test]
fn a_quoted_database_url_is_reported_without_its_password() {
    let quoted = "\"postgres://chat:Hunter2Secret@db:5432/chat\"";
    for origin in [Origin::Process, Origin::Manifest] {
        let mut c = ConfigSet::new();
        c.set_literal(Key::DatabaseUrl, quoted);
        let problems = c.validate(origin);
        let p = problems
            .iter()
            .find(|p| p.key == Key::DatabaseUrl)
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
    c.set_literal(Key::MaxConnections, "lots");
    assert!(
        c.validate(Origin::Process)[0]
            .to_string()
            .contains("`lots`")
    );
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
        set.set_literal(Key::Env, env)
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
