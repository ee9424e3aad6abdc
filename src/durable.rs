//! Files that must never be seen half-written: the registry snapshot, release overrides.
//!
//! Owns: writing a whole file atomically and durably.
//! Must not: know what the files hold (their modules serialise them).

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` so readers see the old file or the new one, never half:
/// a temp file beside it, fsync, rename, then fsync of the folder so the rename holds.
///
/// The temp file gets a name of its own (`tempfile`), not a fixed `path.tmp`: two nodes
/// sharing a runtime folder, or two writers in one process, would otherwise truncate each
/// other's temp file and rename a half-written one into place. It is created 0600.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = folder_of(path);
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    // On failure the temp file is removed when the error drops it.
    tmp.persist(path).map_err(|e| e.error)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The folder `path` is in; `Path::parent` says "" for a bare file name, which is no
/// folder to create a temp file in.
fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two writers to one file at once (two nodes sharing a runtime folder): every write
    /// succeeds and the file is always one writer's whole content, never a mix or a
    /// truncation.
    #[test]
    fn two_writers_at_once_leave_a_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.json");
        // Large enough that a write takes several syscalls and the two interleave.
        const SIZE: usize = 256 * 1024;
        let writers: Vec<_> = [b'a', b'b']
            .into_iter()
            .map(|fill| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let content = vec![fill; SIZE];
                    for _ in 0..50 {
                        write_atomically(&path, &content)?;
                        let seen = std::fs::read(&path)?;
                        let whole = seen.len() == SIZE
                            && (seen.iter().all(|&b| b == b'a') || seen.iter().all(|&b| b == b'b'));
                        if !whole {
                            return Err(std::io::Error::other(format!(
                                "a reader saw {} bytes, not one writer's whole file",
                                seen.len()
                            )));
                        }
                    }
                    Ok::<(), std::io::Error>(())
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap().unwrap();
        }
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("registry.json")],
            "no temp file is left"
        );
    }

    #[test]
    fn a_bare_file_name_is_in_the_current_folder() {
        assert_eq!(folder_of(Path::new("x.json")), Path::new("."));
        assert_eq!(
            folder_of(Path::new("/run/busbar/x.json")),
            Path::new("/run/busbar")
        );
    }
}
