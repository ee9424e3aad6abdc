//! What this binary is: its version, the git commit it was built from and the build date
//! (from `build.rs`), for `busbar --version`, `/readyz` and `busbar_build_info`.
//! Owns: those three strings. Must not: read anything at run time.

/// The crate version, e.g. "0.1.0".
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit (12 hex digits), or "unknown" when built outside a checkout.
pub const COMMIT: &str = env!("BUSBAR_COMMIT");

/// The build date, UTC, as YYYY-MM-DD (`SOURCE_DATE_EPOCH` when set).
pub const BUILD_DATE: &str = env!("BUSBAR_BUILD_DATE");

/// `busbar --version`'s line after the name: "0.1.0 (commit 0123456789ab, built 2026-01-31)".
pub const LONG: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("BUSBAR_COMMIT"),
    ", built ",
    env!("BUSBAR_BUILD_DATE"),
    ")"
);
