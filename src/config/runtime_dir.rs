//! Where `server.runtime_dir` is when the file does not say: a folder that survives a
//! reboot and that no other node on the host picks by accident.
//!
//! In order: `$STATE_DIRECTORY` (systemd sets it from the unit's `StateDirectory=`;
//! the template unit `busbar@NAME` gets `/var/lib/busbar/NAME`), then `/var/lib/busbar`
//! for a config file under `/etc/busbar/` (installed), else `.busbar/` beside the config
//! file (development). Never the system temp folder: a reboot or systemd's `PrivateTmp`
//! wipes it, and every node on the host shares it.
//! Owns: that choice. Must not: create or lock the folder (`statedir` does, at start).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// The environment variable systemd sets to the unit's state folder(s), colon-separated.
pub const STATE_DIRECTORY_ENV: &str = "STATE_DIRECTORY";
/// Where the package keeps its configuration: a config file below it means "installed".
pub const INSTALLED_CONFIG_DIR: &str = "/etc/busbar";
/// The installed state folder (the package creates it, owned by the `busbar` user).
pub const INSTALLED_STATE_DIR: &str = "/var/lib/busbar";
/// The development state folder, beside the config file.
pub const DEV_STATE_DIR: &str = ".busbar";

/// The default runtime folder for a config file in `config_dir`, from this process's
/// environment.
pub fn default_runtime_dir(config_dir: &Path) -> PathBuf {
    pick(std::env::var_os(STATE_DIRECTORY_ENV).as_deref(), config_dir)
}

/// [`default_runtime_dir`] with the environment passed in.
fn pick(state_directory: Option<&OsStr>, config_dir: &Path) -> PathBuf {
    // systemd lists one folder per `StateDirectory=` entry; the first is the unit's own.
    let from_systemd = state_directory
        .and_then(|s| s.to_str())
        .and_then(|s| s.split(':').find(|p| !p.is_empty()));
    if let Some(dir) = from_systemd {
        return PathBuf::from(dir);
    }
    let absolute = std::path::absolute(config_dir).unwrap_or_else(|_| config_dir.to_path_buf());
    if absolute.starts_with(INSTALLED_CONFIG_DIR) {
        PathBuf::from(INSTALLED_STATE_DIR)
    } else {
        config_dir.join(DEV_STATE_DIR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_state_directory_wins() {
        let dir = pick(
            Some(OsStr::new("/var/lib/busbar/a")),
            Path::new("/etc/busbar"),
        );
        assert_eq!(dir, PathBuf::from("/var/lib/busbar/a"));
        // Several StateDirectory= entries: the first one.
        let dir = pick(Some(OsStr::new("/var/lib/x:/var/lib/y")), Path::new("conf"));
        assert_eq!(dir, PathBuf::from("/var/lib/x"));
    }

    #[test]
    fn installed_config_means_var_lib() {
        assert_eq!(
            pick(None, Path::new("/etc/busbar")),
            PathBuf::from(INSTALLED_STATE_DIR)
        );
        assert_eq!(
            pick(Some(OsStr::new("")), Path::new("/etc/busbar/nodes")),
            PathBuf::from(INSTALLED_STATE_DIR)
        );
    }

    #[test]
    fn development_folder_beside_the_config() {
        assert_eq!(pick(None, Path::new("conf")), PathBuf::from("conf/.busbar"));
        assert_eq!(
            pick(None, Path::new("/home/me/busbar")),
            PathBuf::from("/home/me/busbar/.busbar")
        );
        // /etc/busbarx is not /etc/busbar.
        assert_eq!(
            pick(None, Path::new("/etc/busbarx")),
            PathBuf::from("/etc/busbarx/.busbar")
        );
    }
}
