//! The release override file: this node's copy of the overrides, so they survive a
//! restart (and, with etcd, routing follows them before etcd answers).
//!
//! Owns: the file format and the atomic write (temp file, fsync, rename).
//! Must not: trust what it reads: every split is validated; a bad one is skipped.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Overrides;

const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct OverrideFile {
    format: u32,
    saved_at: String,
    /// Route → split, in the admin API's JSON shape.
    routes: BTreeMap<String, serde_json::Value>,
}

/// Writes the overrides atomically: readers see the old file or the new one, never half.
pub fn save(path: &Path, overrides: &Overrides) -> std::io::Result<()> {
    let file = OverrideFile {
        format: FORMAT_VERSION,
        saved_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        routes: overrides
            .iter()
            .map(|(r, s)| (r.clone(), s.to_json()))
            .collect(),
    };
    let bytes = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
    crate::durable::write_atomically(path, &bytes)
}

/// Reads the overrides; a missing file is none.
pub fn load(path: &Path) -> Result<Overrides, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Overrides::new()),
        Err(e) => return Err(e.to_string()),
    };
    let file: OverrideFile = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    if file.format != FORMAT_VERSION {
        return Err(format!("unknown format {}", file.format));
    }
    let mut out = Overrides::new();
    for (route, v) in file.routes {
        match crate::config::parse_split_json(v.to_string().as_bytes()) {
            Ok(s) => {
                out.insert(route, s);
            }
            Err(e) => tracing::warn!(route, "release override skipped: {e}"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_round_trip_and_bad_ones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        assert!(load(&path).unwrap().is_empty());
        let mut o = Overrides::new();
        let split =
            crate::config::parse_split_json(br#"{"stable":"v1","weights":{"v2":5}}"#).unwrap();
        o.insert("orders".into(), split);
        save(&path, &o).unwrap();
        assert_eq!(load(&path).unwrap(), o);
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("\"v2\": 5", "\"v2\": 500");
        std::fs::write(&path, text).unwrap();
        assert!(load(&path).unwrap().is_empty());
    }
}
