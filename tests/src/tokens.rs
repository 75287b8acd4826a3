//! Bearer tokens for the local platform's clients (the fleet, `make run`'s demo):
//! signed with the key the ChatService's Secret holds, so they are valid on every
//! pod, old and new.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

/// The issuer and audience the local platform's ChatServices expect.
pub const ISSUER: &str = "https://issuer.example";
pub const AUDIENCE: &str = "chatgate";

/// How a token is signed.
#[derive(Clone)]
pub enum Signer {
    /// HS256 with a shared secret (the ChatService's `jwt.secretRef`).
    Secret(String),
    /// ES256 with an ECDSA P-256 key pair; the public half goes in the Secret
    /// (`jwt.publicKeyRef`).
    EcKeyPair {
        private_pem: String,
        public_pem: String,
    },
}

impl Signer {
    /// A fresh ES256 key pair.
    pub fn generate_ec() -> Result<Signer> {
        let pair = rcgen::KeyPair::generate().context("generating an ECDSA P-256 key")?;
        Ok(Signer::EcKeyPair {
            private_pem: pair.serialize_pem(),
            public_pem: pair.public_key_pem(),
        })
    }

    /// A token for `user`, valid for `lifetime`.
    pub fn token(&self, user: &str, lifetime: Duration) -> Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let claims = json!({
            "sub": user, "iss": ISSUER, "aud": AUDIENCE,
            "iat": now, "exp": now + lifetime.as_secs(),
        });
        let (header, key) = match self {
            Signer::Secret(secret) => (
                Header::new(Algorithm::HS256),
                EncodingKey::from_secret(secret.as_bytes()),
            ),
            Signer::EcKeyPair { private_pem, .. } => (
                Header::new(Algorithm::ES256),
                EncodingKey::from_ec_pem(private_pem.as_bytes())
                    .context("reading the ECDSA private key")?,
            ),
        };
        jsonwebtoken::encode(&header, &claims, &key).context("signing a token")
    }
}
