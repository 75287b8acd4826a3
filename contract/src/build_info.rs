//! What a binary was built from: the crate version and the git revision, as
//! `--version` prints them and the image labels carry them.

/// The workspace version (`Cargo.toml`), the same for every chatgate binary.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit the build came from (`unknown` outside a checkout).
pub const REVISION: &str = env!("CHATGATE_REVISION");

/// `--version`'s text after the binary name: `0.1.0 (revision 612fbce…)`.
pub const VERSION_LINE: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (revision ",
    env!("CHATGATE_REVISION"),
    ")"
);
