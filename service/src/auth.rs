//! Who is on the other end of `/ws`: the JWT verifier (the `jwt_verifier` critical
//! service), where a token may travel on the upgrade request, and the 401/403
//! answers given before any upgrade happens.
//!
//! Exactly one algorithm is accepted (`CHATGATE_JWT_ALGORITHM`): pinning it is what
//! rejects `alg: none` and HS/RS confusion (an HS256 token signed with an RSA public
//! key as the HMAC secret), because a token whose header names another algorithm
//! never reaches signature verification.

use crate::config::{JwtKeySource, JwtSettings};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use chatgate_contract::config::Key;
use chatgate_contract::paths;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The keys the verifier's errors name, as the contract spells them.
const ALGORITHM_KEY: &str = Key::JwtAlgorithm.as_str();
const PUBLIC_KEY_KEY: &str = Key::JwtPublicKey.as_str();
const JWKS_FILE_KEY: &str = Key::JwtJwksFile.as_str();

/// The user a verified token names (`sub`). Shared, because every frame of a
/// connection and every agent run refer to it.
pub type UserId = Arc<str>;

/// Longest `sub` accepted: user ids end up in logs, keys and rows.
const MAX_SUBJECT_LEN: usize = 256;

/// Verifies tokens. Cheap to clone: keys are decoded once, at startup.
#[derive(Clone)]
pub struct JwtVerifier {
    inner: Arc<VerifierInner>,
}

struct VerifierInner {
    algorithm: Algorithm,
    keys: Keys,
    validation: Validation,
}

enum Keys {
    One(DecodingKey),
    /// From a JWKS file: chosen by the token's `kid` (or the only key, if one).
    ByKid(HashMap<String, DecodingKey>),
}

/// A development token printed at startup when no secret was configured.
pub struct DevToken {
    pub user_id: String,
    pub token: String,
    pub valid_for: Duration,
}

#[derive(Deserialize)]
struct Subject {
    // Optional here so a token without `sub` is reported as a missing claim by
    // validation, not as a malformed token.
    sub: Option<String>,
    /// Required by validation; read to end the socket when the token does.
    #[serde(default)]
    exp: Option<u64>,
}

/// A token that passed verification: the user it names, and when the access it
/// grants ends — its `exp` plus the clock-skew leeway the upgrade also allowed
/// (`None`: an `exp` beyond what the clock can represent).
#[derive(Debug, Clone)]
pub struct Verified {
    pub user: UserId,
    pub expires_at: Option<SystemTime>,
}

#[derive(Serialize)]
struct DevClaims<'a> {
    sub: &'a str,
    exp: u64,
    iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

impl JwtVerifier {
    /// Builds the verifier from validated settings. The error names the key to fix.
    /// In development without a secret, a random secret is generated and a token
    /// for the user `dev-user` returned alongside.
    pub fn from_settings(
        settings: &JwtSettings,
    ) -> Result<(JwtVerifier, Option<DevToken>), String> {
        let algorithm = match settings.algorithm.as_str() {
            "HS256" => Algorithm::HS256,
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            other => {
                return Err(format!(
                    "{ALGORITHM_KEY} `{other}` is not supported; use HS256, RS256 or ES256"
                ));
            }
        };
        let mut dev = None;
        let keys = match &settings.key {
            JwtKeySource::Secret(secret) => Keys::One(DecodingKey::from_secret(secret.as_bytes())),
            JwtKeySource::GenerateDevSecret => {
                let secret: [u8; 32] = rand::random();
                let secret = hex(&secret);
                dev = Some(mint_dev_token(&secret, settings)?);
                Keys::One(DecodingKey::from_secret(secret.as_bytes()))
            }
            JwtKeySource::PublicKeyPem(pem) => Keys::One(public_key(algorithm, pem)?),
            JwtKeySource::JwksFile(path) => Keys::ByKid(jwks(algorithm, path)?),
        };

        let mut validation = Validation::new(algorithm);
        validation.leeway = settings.leeway.as_secs();
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(iss) = &settings.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        match &settings.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            // Without a configured audience, a token's `aud` is not ours to judge.
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);

        let verifier = JwtVerifier {
            inner: Arc::new(VerifierInner {
                algorithm,
                keys,
                validation,
            }),
        };
        Ok((verifier, dev))
    }

    /// Verifies a token and returns the user it names and when its access ends.
    pub fn verify(&self, token: &str) -> Result<Verified, AuthError> {
        let inner = &*self.inner;
        let key = match &inner.keys {
            Keys::One(key) => key,
            Keys::ByKid(keys) => {
                let header = jsonwebtoken::decode_header(token).map_err(AuthError::from_jwt)?;
                if header.alg != inner.algorithm {
                    return Err(AuthError::AlgorithmNotAllowed);
                }
                match header.kid.as_deref() {
                    Some(kid) => keys.get(kid).ok_or(AuthError::UnknownKey)?,
                    None if keys.len() == 1 => keys.values().next().ok_or(AuthError::UnknownKey)?,
                    None => return Err(AuthError::UnknownKey),
                }
            }
        };
        let data = jsonwebtoken::decode::<Subject>(token, key, &inner.validation)
            .map_err(AuthError::from_jwt)?;
        let sub = data.claims.sub.ok_or(AuthError::MissingClaim)?;
        if sub.is_empty() || sub.len() > MAX_SUBJECT_LEN || sub.chars().any(char::is_control) {
            return Err(AuthError::BadSubject);
        }
        let exp = data.claims.exp.ok_or(AuthError::MissingClaim)?;
        let expires_at = UNIX_EPOCH.checked_add(Duration::from_secs(
            exp.saturating_add(inner.validation.leeway),
        ));
        Ok(Verified {
            user: Arc::from(sub),
            expires_at,
        })
    }
}

fn public_key(algorithm: Algorithm, pem_or_path: &str) -> Result<DecodingKey, String> {
    // A mounted Secret is a file; an env var holds the PEM itself. Accept both.
    let pem = if pem_or_path.contains("-----BEGIN") {
        pem_or_path.to_string()
    } else {
        // The value is not echoed: a key pointed at the wrong Secret key may hold a
        // secret (an HS256 secret, say), and this message reaches the pod's status.
        std::fs::read_to_string(pem_or_path.trim()).map_err(|e| {
            format!(
                "{PUBLIC_KEY_KEY} is neither a PEM key (no -----BEGIN line) nor a readable file ({e}); set it to the PEM text or a path to it"
            )
        })?
    };
    let key = match algorithm {
        Algorithm::RS256 => DecodingKey::from_rsa_pem(pem.as_bytes()),
        _ => DecodingKey::from_ec_pem(pem.as_bytes()),
    };
    key.map_err(|e| {
        format!(
            "{PUBLIC_KEY_KEY} is not a PEM {} public key ({e}); set it to the issuer's public key",
            if algorithm == Algorithm::RS256 {
                "RSA"
            } else {
                "EC P-256"
            }
        )
    })
}

fn jwks(
    algorithm: Algorithm,
    path: &std::path::Path,
) -> Result<HashMap<String, DecodingKey>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "{JWKS_FILE_KEY} {} cannot be read: {e}; mount the JWKS file there",
            path.display()
        )
    })?;
    let set: JwkSet = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{JWKS_FILE_KEY} {} is not a JWKS document ({e}); it must be {{\"keys\": [...]}}",
            path.display()
        )
    })?;
    let mut keys = HashMap::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let fits = matches!(
            (&jwk.algorithm, algorithm),
            (AlgorithmParameters::RSA(_), Algorithm::RS256)
                | (AlgorithmParameters::EllipticCurve(_), Algorithm::ES256)
        );
        let alg_ok = jwk
            .common
            .key_algorithm
            .is_none_or(|a| format!("{a:?}") == format!("{algorithm:?}"));
        if !fits || !alg_ok {
            continue;
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| {
            format!(
                "{JWKS_FILE_KEY} {}: key #{i} cannot be used ({e})",
                path.display()
            )
        })?;
        let kid = jwk.common.key_id.clone().unwrap_or_default();
        keys.insert(kid, key);
    }
    if keys.is_empty() {
        return Err(format!(
            "{JWKS_FILE_KEY} {} holds no {algorithm:?} key; add the issuer's public key or change {ALGORITHM_KEY}",
            path.display()
        ));
    }
    Ok(keys)
}

fn mint_dev_token(secret: &str, settings: &JwtSettings) -> Result<DevToken, String> {
    let valid_for = Duration::from_secs(24 * 3600);
    let now = jsonwebtoken::get_current_timestamp();
    let user_id = "dev-user";
    let claims = DevClaims {
        sub: user_id,
        iat: now,
        exp: now + valid_for.as_secs(),
        iss: settings.issuer.as_deref(),
        aud: settings.audience.as_deref(),
    };
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| format!("cannot sign the development token: {e}"))?;
    Ok(DevToken {
        user_id: user_id.to_string(),
        token,
        valid_for,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the token came from, and the subprotocol to select (never a token entry).
#[derive(Debug)]
pub struct Credentials {
    pub token: String,
    pub subprotocol: Option<&'static str>,
}

/// Finds the token on an upgrade request, in the order the wire protocol lists.
/// Query strings are never looked at: they end up in access logs.
pub fn credentials(headers: &HeaderMap) -> Result<Credentials, AuthError> {
    let offered = offered_subprotocols(headers);
    let select = |name: &'static str| offered.contains(&name).then_some(name);
    // A client that offers our protocol names gets one selected even when its
    // token travels in the header, so browsers and tools see a valid handshake.
    let default_protocol =
        select(paths::SUBPROTOCOL_V1).or_else(|| select(paths::SUBPROTOCOL_LEGACY));

    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| AuthError::Malformed)?;
        let (scheme, token) = value.trim().split_once(' ').ok_or(AuthError::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
            return Err(AuthError::Malformed);
        }
        return Ok(Credentials {
            token: token.trim().to_string(),
            subprotocol: default_protocol,
        });
    }
    for entry in &offered {
        if let Some(token) = entry.strip_prefix(paths::SUBPROTOCOL_BEARER_PREFIX) {
            return Ok(Credentials {
                token: token.to_string(),
                subprotocol: select(paths::SUBPROTOCOL_V1),
            });
        }
    }
    for entry in &offered {
        if let Some(encoded) = entry.strip_prefix(paths::SUBPROTOCOL_LEGACY_TOKEN_PREFIX) {
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(encoded.trim_end_matches('='))
                .map_err(|_| AuthError::Malformed)?;
            let token = String::from_utf8(bytes).map_err(|_| AuthError::Malformed)?;
            return Ok(Credentials {
                token,
                subprotocol: select(paths::SUBPROTOCOL_LEGACY),
            });
        }
    }
    Err(AuthError::Missing)
}

fn offered_subprotocols(headers: &HeaderMap) -> Vec<&str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

/// Checks `Origin` against the allow-list. Requests without `Origin` come from
/// non-browser clients, which an Origin check cannot protect anyway.
pub fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    if allowed.is_empty() {
        return true;
    }
    match headers.get(header::ORIGIN).map(HeaderValue::to_str) {
        None => true,
        Some(Ok(origin)) => {
            let origin = origin.trim().trim_end_matches('/');
            allowed.iter().any(|a| a.eq_ignore_ascii_case(origin))
        }
        Some(Err(_)) => false,
    }
}

/// Why an upgrade was refused. 401 for every token problem (the credential is not
/// valid for this service — a token for another audience included, as RFC 6750's
/// `invalid_token`); 403 only for a browser origin that is not allowed, where a
/// new token would not help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    Missing,
    Malformed,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    AlgorithmNotAllowed,
    InvalidSignature,
    UnknownKey,
    MissingClaim,
    BadSubject,
    Invalid,
    OriginNotAllowed,
}

impl AuthError {
    fn from_jwt(e: jsonwebtoken::errors::Error) -> AuthError {
        use jsonwebtoken::errors::ErrorKind as K;
        match e.kind() {
            K::ExpiredSignature => AuthError::Expired,
            K::ImmatureSignature => AuthError::NotYetValid,
            K::InvalidIssuer => AuthError::WrongIssuer,
            K::InvalidAudience => AuthError::WrongAudience,
            K::InvalidAlgorithm | K::InvalidAlgorithmName | K::MissingAlgorithm => {
                AuthError::AlgorithmNotAllowed
            }
            K::InvalidSignature => AuthError::InvalidSignature,
            K::MissingRequiredClaim(_) => AuthError::MissingClaim,
            K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => AuthError::Malformed,
            _ => AuthError::Invalid,
        }
    }

    /// Stable snake_case reason for clients and metrics.
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "token_missing",
            AuthError::Malformed => "token_malformed",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid => "token_not_yet_valid",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::AlgorithmNotAllowed => "algorithm_not_allowed",
            AuthError::InvalidSignature => "invalid_signature",
            AuthError::UnknownKey => "unknown_key",
            AuthError::MissingClaim => "missing_claim",
            AuthError::BadSubject => "invalid_subject",
            AuthError::Invalid => "token_invalid",
            AuthError::OriginNotAllowed => "origin_not_allowed",
        }
    }

    fn message(self) -> &'static str {
        match self {
            AuthError::Missing => {
                "no token: send `Authorization: Bearer <jwt>` or the subprotocols `chatgate.v1, bearer.<jwt>`"
            }
            AuthError::Malformed => "the token is not a well-formed JWT",
            AuthError::Expired => "the token has expired; get a new one",
            AuthError::NotYetValid => "the token is not valid yet (nbf); check the clocks",
            AuthError::WrongIssuer => "the token's issuer (iss) is not the one this service trusts",
            AuthError::WrongAudience => "the token is for another audience (aud)",
            AuthError::AlgorithmNotAllowed => {
                "the token's algorithm is not the one this service accepts"
            }
            AuthError::InvalidSignature => "the token's signature does not verify",
            AuthError::UnknownKey => "the token's key id (kid) is not in the configured JWKS",
            AuthError::MissingClaim => "the token lacks a required claim (exp, sub, iss or aud)",
            AuthError::BadSubject => "the token's subject (sub) is empty or too long",
            AuthError::Invalid => "the token is not valid",
            AuthError::OriginNotAllowed => {
                "this page's origin may not open the chat socket (CHATGATE_ALLOWED_ORIGINS)"
            }
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            AuthError::OriginNotAllowed => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        }
    }
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = serde_json::json!({
            "error": if status == StatusCode::FORBIDDEN { "forbidden" } else { "unauthorized" },
            "reason": self.reason(),
            "message": self.message(),
        });
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(secret: &str) -> JwtSettings {
        JwtSettings {
            algorithm: chatgate_contract::JwtAlgorithm::HS256,
            key: JwtKeySource::Secret(secret.into()),
            issuer: Some("iss".into()),
            audience: Some("aud".into()),
            leeway: Duration::from_secs(5),
        }
    }

    fn token(secret: &str, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn a_valid_token_names_its_subject() {
        let (v, _) = JwtVerifier::from_settings(&settings("s")).unwrap();
        let now = jsonwebtoken::get_current_timestamp();
        let t = token(
            "s",
            serde_json::json!({"sub":"u1","exp":now+60,"iss":"iss","aud":"aud"}),
        );
        assert_eq!(&*v.verify(&t).unwrap().user, "u1");
    }

    #[test]
    fn access_ends_at_exp_plus_the_leeway() {
        let (v, _) = JwtVerifier::from_settings(&settings("s")).unwrap();
        let now = jsonwebtoken::get_current_timestamp();
        let t = token(
            "s",
            serde_json::json!({"sub":"u1","exp":now+60,"iss":"iss","aud":"aud"}),
        );
        let leeway = settings("s").leeway.as_secs();
        assert_eq!(
            v.verify(&t).unwrap().expires_at,
            Some(UNIX_EPOCH + Duration::from_secs(now + 60 + leeway))
        );
        // An `exp` past what the clock holds is accepted and never ends the socket;
        // it must not panic.
        let t = token(
            "s",
            serde_json::json!({"sub":"u1","exp":u64::MAX,"iss":"iss","aud":"aud"}),
        );
        assert_eq!(v.verify(&t).unwrap().expires_at, None);
    }

    #[test]
    fn missing_issuer_is_refused_when_one_is_configured() {
        let (v, _) = JwtVerifier::from_settings(&settings("s")).unwrap();
        let now = jsonwebtoken::get_current_timestamp();
        let t = token(
            "s",
            serde_json::json!({"sub":"u1","exp":now+60,"aud":"aud"}),
        );
        assert_eq!(v.verify(&t).unwrap_err(), AuthError::MissingClaim);
    }

    #[test]
    fn a_token_without_sub_lacks_a_claim() {
        let (v, _) = JwtVerifier::from_settings(&settings("s")).unwrap();
        let now = jsonwebtoken::get_current_timestamp();
        let t = token(
            "s",
            serde_json::json!({"exp":now+60,"iss":"iss","aud":"aud"}),
        );
        assert_eq!(v.verify(&t).unwrap_err(), AuthError::MissingClaim);
    }

    #[test]
    fn the_dev_token_verifies() {
        let mut s = settings("");
        s.key = JwtKeySource::GenerateDevSecret;
        let (v, dev) = JwtVerifier::from_settings(&s).unwrap();
        let dev = dev.unwrap();
        assert_eq!(&*v.verify(&dev.token).unwrap().user, "dev-user");
    }

    #[test]
    fn token_entries_are_never_selected() {
        let mut h = HeaderMap::new();
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("chatgate.v1, bearer.abc.def.ghi"),
        );
        let c = credentials(&h).unwrap();
        assert_eq!(c.token, "abc.def.ghi");
        assert_eq!(c.subprotocol, Some("chatgate.v1"));
        let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("x.y.z");
        let mut h = HeaderMap::new();
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_str(&format!("jwt-auth, jwt.{encoded}")).unwrap(),
        );
        let c = credentials(&h).unwrap();
        assert_eq!(c.token, "x.y.z");
        assert_eq!(c.subprotocol, Some("jwt-auth"));
    }

    #[test]
    fn origins_are_compared_without_case_or_trailing_slash() {
        let allowed = vec!["https://chat.example.com".to_string()];
        let mut h = HeaderMap::new();
        assert!(origin_allowed(&h, &allowed));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://Chat.example.com/"),
        );
        assert!(origin_allowed(&h, &allowed));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example.com"),
        );
        assert!(!origin_allowed(&h, &allowed));
    }
}
