//! The registry's disk snapshot: the last known instances, so a restarted node routes
//! at once, even while its registry store (etcd) is unreachable.
//!
//! Owns: the file format and the atomic write (temp file, fsync, rename).
//! Must not: decide when to write (the sync task debounces) or trust what it reads:
//! a corrupt or truncated file is reported and ignored.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::store::Registration;

const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    format: u32,
    saved_at: String,
    instances: Vec<Registration>,
}

/// Writes the instances atomically: readers see the old file or the new one, never half.
pub fn save(path: &Path, instances: &[Registration]) -> std::io::Result<()> {
    let file = SnapshotFile {
        format: FORMAT_VERSION,
        saved_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        instances: instances.to_vec(),
    };
    let bytes = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
    crate::durable::write_atomically(path, &bytes)
}

/// Reads a snapshot. A missing file is `Ok(empty)`; anything unreadable is an error to
/// report, never a panic.
pub fn load(path: &Path) -> Result<Vec<Registration>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let file: SnapshotFile = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{}: not a registry snapshot: {e}", path.display()))?;
    if file.format != FORMAT_VERSION {
        return Err(format!(
            "{}: unknown snapshot format {}",
            path.display(),
            file.format
        ));
    }
    Ok(file.instances)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("reg.json");
        assert!(load(&p).unwrap().is_empty());
        let r = Registration {
            service: "a".into(),
            id: "1".into(),
            address: "127.0.0.1:5".parse().unwrap(),
            sidecar: None,
            weight: 2,
            zone: Some("z".into()),
            version: None,
            metadata: Default::default(),
            ttl_secs: 10,
            tls: None,
        };
        save(&p, std::slice::from_ref(&r)).unwrap();
        assert_eq!(load(&p).unwrap(), vec![r]);
        let full = std::fs::read(&p).unwrap();
        std::fs::write(&p, &full[..full.len() / 2]).unwrap();
        assert!(load(&p).unwrap_err().contains("not a registry snapshot"));
    }
}
