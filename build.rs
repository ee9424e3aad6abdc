//! Build script: the commit busbar was built from, for `busbar_build_info{commit}`.
//!
//! Owns: the `BUSBAR_COMMIT` compile-time variable: `$BUSBAR_COMMIT` when set (a package
//! built outside a git checkout), else `git rev-parse HEAD`, else "unknown".
//! Must not: fail the build; a missing git or repository is not an error.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=BUSBAR_COMMIT");
    let commit = match std::env::var("BUSBAR_COMMIT") {
        Ok(c) if !c.is_empty() => c,
        _ => {
            // Rebuild when HEAD moves: HEAD itself (a detached or switched checkout), the
            // branch it points to, and packed refs (a worktree's git dir is elsewhere).
            if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
                println!("cargo:rerun-if-changed={head}");
            }
            if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
                let r = git(&["rev-parse", "--git-path", &branch]);
                // A packed branch has no file of its own (a missing file would rerun this
                // script on every build); packed-refs covers it.
                if let Some(r) = r.filter(|r| std::path::Path::new(r).exists()) {
                    println!("cargo:rerun-if-changed={r}");
                }
            }
            if let Some(packed) = git(&["rev-parse", "--git-path", "packed-refs"]) {
                if std::path::Path::new(&packed).exists() {
                    println!("cargo:rerun-if-changed={packed}");
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
    };
    println!("cargo:rustc-env=BUSBAR_COMMIT={commit}");
}
