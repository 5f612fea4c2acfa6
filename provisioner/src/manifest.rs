//! `wakegate.toml` at a repository's root: how to build, run and health-check a preview.
//!
//! ```toml
//! build = "npm ci && npm run build"   # optional
//! run = "npm start"                   # required; must listen on $PORT
//! health = "/healthz"                 # optional, default "/"
//! build_timeout_secs = 600            # optional
//! start_timeout_secs = 60             # optional
//! [env]                               # optional
//! NODE_ENV = "production"
//! ```

use serde::Deserialize;
use std::collections::BTreeMap;

pub const FILE: &str = "wakegate.toml";

#[derive(Clone, Debug, Deserialize, PartialEq, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(default)]
    pub build: Option<String>,
    pub run: String,
    #[serde(default = "default_health")]
    pub health: String,
    #[serde(default = "default_build_timeout")]
    pub build_timeout_secs: u64,
    #[serde(default = "default_start_timeout")]
    pub start_timeout_secs: u64,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

fn default_health() -> String {
    "/".into()
}
fn default_build_timeout() -> u64 {
    600
}
fn default_start_timeout() -> u64 {
    60
}

impl Manifest {
    pub fn parse(text: &str) -> Result<Manifest, String> {
        let m: Manifest = toml::from_str(text).map_err(|e| format!("{FILE}: {e}"))?;
        if m.run.trim().is_empty() {
            return Err(format!("{FILE}: run must not be empty"));
        }
        if !m.health.starts_with('/') {
            return Err(format!("{FILE}: health must be a path starting with '/'"));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let m = Manifest::parse("run = \"python3 app.py\"\n[env]\nA = \"1\"\n").unwrap();
        assert_eq!(m.health, "/");
        assert_eq!(m.env["A"], "1");
        assert!(Manifest::parse("build = \"x\"").is_err());
        assert!(Manifest::parse("run = \"x\"\nhealth = \"nope\"").is_err());
        assert!(Manifest::parse("run = \"x\"\nbogus = 1").unwrap_err().contains("bogus"));
    }
}
