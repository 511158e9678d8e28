//! Finding a resource's config by name, as `drbdadm` finds its resources:
//! `mirrorctl status r0` reads `/etc/nbd-mirror/r0.toml`. The directory is
//! `$MIRROR_CONF_DIR` when set (tests, a second installation), else
//! [`DEFAULT_CONF_DIR`]. `--config FILE` still names any other file.

use std::path::{Path, PathBuf};

use super::{load, valid_resource_name, ConfigError, Settings};

/// Where resource configs live: `{DEFAULT_CONF_DIR}/{resource}.toml`.
pub const DEFAULT_CONF_DIR: &str = "/etc/nbd-mirror";
/// Environment variable that replaces [`DEFAULT_CONF_DIR`] when set and not empty.
pub const CONF_DIR_ENV: &str = "MIRROR_CONF_DIR";

/// The config directory: `$MIRROR_CONF_DIR`, else `/etc/nbd-mirror`.
pub fn conf_dir() -> PathBuf {
    match std::env::var_os(CONF_DIR_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(DEFAULT_CONF_DIR),
    }
}

/// The names of the resources with a config in `dir` (`NAME.toml`), sorted.
pub fn resources_in(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".toml")?;
            valid_resource_name(stem).then(|| stem.to_string())
        })
        .collect();
    names.sort();
    names
}

/// `dir/NAME.toml` for a resource name, or why the name cannot be one.
pub fn resource_file_in(dir: &Path, name: &str) -> Result<PathBuf, ConfigError> {
    let file = dir.join(format!("{name}.toml"));
    if !valid_resource_name(name) {
        return Err(ConfigError {
            file,
            key: None,
            reason: format!(
                "`{name}` is not a resource name (at most 63 letters, digits, '-', '_' or \
                 '.'); give a config file with --config"
            ),
        });
    }
    Ok(file)
}

/// Loads the config to use: `--config FILE` when given, else the named
/// resource's file in [`conf_dir`]. With both, the file must be that
/// resource's. With neither, the error lists the resources found.
pub fn load_for(
    config: Option<&Path>,
    resource: Option<&str>,
    node_cli: Option<&str>,
) -> Result<Settings, ConfigError> {
    load_in(&conf_dir(), config, resource, node_cli)
}

/// [`load_for`] with the config directory given.
pub fn load_in(
    dir: &Path,
    config: Option<&Path>,
    resource: Option<&str>,
    node_cli: Option<&str>,
) -> Result<Settings, ConfigError> {
    let file = match (config, resource) {
        (Some(f), _) => f.to_path_buf(),
        (None, Some(name)) => resource_file_in(dir, name)?,
        (None, None) => {
            let found = resources_in(dir);
            let have = if found.is_empty() {
                "none found there".to_string()
            } else {
                format!("found there: {}", found.join(", "))
            };
            return Err(ConfigError {
                file: dir.to_path_buf(),
                key: None,
                reason: format!(
                    "no resource given: name one (`mirrorctl status r0` reads {}/r0.toml; \
                     {have}) or give --config FILE",
                    dir.display()
                ),
            });
        }
    };
    if config.is_none() && !file.exists() {
        return Err(ConfigError {
            file: file.clone(),
            key: None,
            reason: format!(
                "no such resource: the file does not exist (resources are read from {}, \
                 ${CONF_DIR_ENV} overrides; --config FILE reads another file)",
                dir.display()
            ),
        });
    }
    let s = load(&file, node_cli)?;
    match resource {
        Some(name) if name != s.resource => Err(ConfigError {
            file,
            key: Some("resource.name".into()),
            reason: format!("is `{}`, not the resource `{name}` asked for", s.resource),
        }),
        _ => Ok(s),
    }
}

#[cfg(test)]
mod tests;
