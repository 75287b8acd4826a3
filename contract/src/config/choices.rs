//! The closed sets of values some keys take — the JWT algorithm and the LLM provider —
//! as types shared by the CRD, the service's typed settings and the key table, so
//! their names and defaults are written once.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The names of a closed set's variants, in order, taken from its `ALL` and
/// `as_str` so the key table never keeps a second list.
macro_rules! names_of {
    ($set:ident) => {{
        let mut names = [""; $set::ALL.len()];
        let mut i = 0;
        while i < names.len() {
            names[i] = $set::ALL[i].as_str();
            i += 1;
        }
        names
    }};
}
pub(crate) use names_of;

/// `Display` and `FromStr` of a closed set by its `as_str` names; a parse error lists
/// the accepted names under `what` ("a JWT algorithm").
macro_rules! named {
    ($set:ident, $what:literal) => {
        impl fmt::Display for $set {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl FromStr for $set {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $set::ALL
                    .into_iter()
                    .find(|v| v.as_str() == s.trim())
                    .ok_or_else(|| {
                        format!("`{s}` is not {} (use {})", $what, $set::NAMES.join(", "))
                    })
            }
        }
    };
}

/// The JWT signature algorithm `/ws` accepts (exactly one).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum JwtAlgorithm {
    HS256,
    RS256,
    ES256,
}

impl JwtAlgorithm {
    pub const ALL: [JwtAlgorithm; 3] = [
        JwtAlgorithm::HS256,
        JwtAlgorithm::RS256,
        JwtAlgorithm::ES256,
    ];
    pub const NAMES: [&'static str; JwtAlgorithm::ALL.len()] = names_of!(JwtAlgorithm);
    /// What an unset `CHATGATE_JWT_ALGORITHM` and an unset `spec.jwt.algorithm` mean.
    pub const DEFAULT: JwtAlgorithm = JwtAlgorithm::HS256;

    pub const fn as_str(self) -> &'static str {
        match self {
            JwtAlgorithm::HS256 => "HS256",
            JwtAlgorithm::RS256 => "RS256",
            JwtAlgorithm::ES256 => "ES256",
        }
    }
}

impl Default for JwtAlgorithm {
    fn default() -> Self {
        JwtAlgorithm::DEFAULT
    }
}

named!(JwtAlgorithm, "a JWT algorithm");

/// Which LLM API the agent supervisor calls.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LlmProvider {
    /// Deterministic, offline; for development and tests.
    Builtin,
    /// An OpenAI-compatible chat-completions API.
    Openai,
}

impl LlmProvider {
    pub const ALL: [LlmProvider; 2] = [LlmProvider::Builtin, LlmProvider::Openai];
    pub const NAMES: [&'static str; LlmProvider::ALL.len()] = names_of!(LlmProvider);
    /// What an unset `CHATGATE_LLM_PROVIDER` and an unset `spec.llm.provider` mean.
    pub const DEFAULT: LlmProvider = LlmProvider::Builtin;

    pub const fn as_str(self) -> &'static str {
        match self {
            LlmProvider::Builtin => "builtin",
            LlmProvider::Openai => "openai",
        }
    }
}

impl Default for LlmProvider {
    fn default() -> Self {
        LlmProvider::DEFAULT
    }
}

named!(LlmProvider, "an LLM provider");

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::IntoDeserializer;
    use serde::de::value::{Error, StrDeserializer};

    /// The name serde reads, which is what the CRD's YAML carries.
    fn from_yaml_name<'de, T: Deserialize<'de>>(name: &'de str) -> T {
        let name: StrDeserializer<'de, Error> = name.into_deserializer();
        T::deserialize(name).expect("a known name")
    }

    #[test]
    fn names_round_trip_through_text_and_serde() {
        for a in JwtAlgorithm::ALL {
            assert_eq!(a.as_str().parse::<JwtAlgorithm>(), Ok(a));
            assert_eq!(from_yaml_name::<JwtAlgorithm>(a.as_str()), a);
        }
        for p in LlmProvider::ALL {
            assert_eq!(p.as_str().parse::<LlmProvider>(), Ok(p));
            assert_eq!(from_yaml_name::<LlmProvider>(p.as_str()), p);
        }
        assert_eq!(JwtAlgorithm::NAMES, ["HS256", "RS256", "ES256"]);
        assert_eq!(LlmProvider::NAMES, ["builtin", "openai"]);
        assert!("hs256".parse::<JwtAlgorithm>().is_err());
    }
}
