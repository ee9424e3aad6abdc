//! Files that must never be seen half-written: the registry snapshot, release overrides.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` so readers see the old file or the new one, never half:
/// a temp file beside it, fsync, rename, then fsync of the folder so the rename holds.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}
