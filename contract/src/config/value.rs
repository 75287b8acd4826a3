//! The types of key values and the checks applied to literals, which never quote a
//! secret's characters.

use std::collections::BTreeSet;

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
    pub(super) fn describe(self) -> String {
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
    pub(super) fn check(self, value: &str, shown: Shown) -> Result<(), String> {
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
    pub(super) fn normalize(self, value: &str) -> String {
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

fn split_list(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Whether a check may quote the value it rejects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shown {
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
