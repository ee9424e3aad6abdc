//! The node's state folder (`server.runtime_dir`) at start: created if missing, and
//! claimed with a lock file so two nodes on one host never share it by accident (they
//! would overwrite each other's registry snapshot and release overrides).
//!
//! The lock is `flock` on `<runtime_dir>/busbar.lock`, held until the process exits (the
//! kernel drops it then, also on a crash, so a stale file never blocks a start). The file
//! holds the owner's pid, for the refusal message. A process started with `--upgrade`
//! shares the folder with the one it replaces: it waits for the lock in the background
//! and takes it when the old process exits.
//! Owns: creating and locking the folder. Must not: choose it (`config::runtime_dir`).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file's name inside the runtime folder.
pub const LOCK_FILE: &str = "busbar.lock";

/// Why the folder cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("cannot create the runtime folder {dir} (server.runtime_dir): {source}")]
    Create {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the runtime folder {dir} is in use by another busbar ({owner}): give each node its \
         own server.runtime_dir (or StateDirectory=), or stop the other one"
    )]
    InUse { dir: PathBuf, owner: String },
}

/// The held lock; dropping it releases the folder.
#[derive(Debug)]
pub struct StateDirLock {
    _file: Option<File>,
}

/// Creates `dir` if needed and locks it for this process. With `upgrade`, a lock held by
/// the process being replaced is waited for on a background thread instead of refused.
pub fn claim(dir: &Path, upgrade: bool) -> Result<StateDirLock, StateDirError> {
    std::fs::create_dir_all(dir).map_err(|source| StateDirError::Create {
        dir: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join(LOCK_FILE);
    let lock_err = |source| StateDirError::Lock {
        path: path.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(lock_err)?;
    match file.try_lock() {
        Ok(()) => {
            write_pid(&mut file);
            Ok(StateDirLock { _file: Some(file) })
        }
        Err(TryLockError::WouldBlock) if upgrade => {
            tracing::info!(lock = %path.display(), "upgrade: the runtime folder is taken over when the old process exits");
            let held = path.clone();
            std::thread::Builder::new()
                .name("state lock".into())
                .spawn(move || match file.lock() {
                    Ok(()) => {
                        write_pid(&mut file);
                        tracing::info!(lock = %held.display(), "runtime folder lock taken over");
                        // Held for the rest of the process.
                        std::mem::forget(file);
                    }
                    Err(e) => tracing::error!(lock = %held.display(), "cannot lock: {e}"),
                })
                .map_err(lock_err)?;
            Ok(StateDirLock { _file: None })
        }
        Err(TryLockError::WouldBlock) => {
            let mut owner = String::new();
            let _ = file.read_to_string(&mut owner);
            let owner = match owner.trim().parse::<u32>() {
                Ok(pid) => format!("pid {pid}"),
                Err(_) => format!("holder of {}", path.display()),
            };
            Err(StateDirError::InUse {
                dir: dir.to_path_buf(),
                owner,
            })
        }
        Err(TryLockError::Error(source)) => Err(lock_err(source)),
    }
}

/// Records the owner's pid in the lock file (best effort: the lock is what counts).
fn write_pid(file: &mut File) {
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = writeln!(file, "{}", std::process::id());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_is_refused_until_the_first_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let first = claim(&dir, false).expect("first claim");
        let pid = std::fs::read_to_string(dir.join(LOCK_FILE)).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
        match claim(&dir, false) {
            Err(StateDirError::InUse { owner, .. }) => {
                assert_eq!(owner, format!("pid {}", std::process::id()))
            }
            other => panic!("expected InUse, got {other:?}"),
        }
        drop(first);
        claim(&dir, false).expect("claim after release");
    }

    #[test]
    fn an_upgrade_waits_instead_of_refusing() {
        let tmp = tempfile::tempdir().unwrap();
        let _first = claim(tmp.path(), false).unwrap();
        assert!(claim(tmp.path(), true).is_ok());
    }
}
