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
//! [database]                          # optional: the preview gets its own database
//! engine = "postgres"                 # or "mariadb"
//! name = "app"                        # optional, default "app"
//! env = "url"                         # DATABASE_URL (default), or "vars": DB_HOST, DB_PORT,
//!                                     # DB_NAME, DB_USER, DB_PASSWORD
//! sanitize = "db/sanitize.sql"        # the default; runs after every import. `false` opts out
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
    #[serde(default)]
    pub database: Option<Database>,
}

/// The `[database]` table.
#[derive(Clone, Debug, Deserialize, PartialEq, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Database {
    pub engine: wakegate_db::Engine,
    #[serde(default = "default_db_name")]
    pub name: String,
    #[serde(default)]
    pub env: DbEnv,
    /// A path in the repository, or `false`; by default [`DEFAULT_SANITIZE`], which must
    /// exist when a dump is imported (sanitising is opted out of, never forgotten).
    #[serde(default)]
    pub sanitize: Option<Sanitize>,
}

/// How the app is told where its database is.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DbEnv {
    /// `DATABASE_URL=postgres://user:password@127.0.0.1:port/name` (`mysql://` for MariaDB).
    #[default]
    Url,
    /// `DB_HOST`, `DB_PORT`, `DB_NAME`, `DB_USER`, `DB_PASSWORD` (what Drupal's settings read).
    Vars,
}

#[derive(Clone, Debug, Deserialize, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum Sanitize {
    Path(String),
    /// `false` opts out; `true` is the default path.
    On(bool),
}

pub const DEFAULT_SANITIZE: &str = "db/sanitize.sql";

fn default_db_name() -> String {
    "app".into()
}

impl Database {
    /// The sanitize file to run after an import, if any; `Err` when the default is
    /// wanted and missing is decided by the caller (it knows the checkout).
    pub fn sanitize_path(&self) -> Option<&str> {
        match &self.sanitize {
            None | Some(Sanitize::On(true)) => Some(DEFAULT_SANITIZE),
            Some(Sanitize::Path(p)) => Some(p),
            Some(Sanitize::On(false)) => None,
        }
    }

    fn check(&self) -> Result<(), String> {
        let n = &self.name;
        if n.is_empty()
            || n.len() > 63
            || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            || n.as_bytes()[0].is_ascii_digit()
        {
            return Err(format!(
                "{FILE}: database.name must be 1–63 characters of a-z, 0-9 and '_', not starting with a digit"
            ));
        }
        if let Some(Sanitize::Path(p)) = &self.sanitize {
            if p.is_empty() || p.starts_with('/') || p.split('/').any(|s| s == "..") {
                return Err(format!("{FILE}: database.sanitize must be a path inside the repository"));
            }
        }
        Ok(())
    }
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
        if let Some(db) = &m.database {
            db.check()?;
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
        let m = Manifest::parse("run = \"x\"\n[database]\nengine = \"postgres\"\n").unwrap();
        let db = m.database.unwrap();
        assert_eq!((db.name.as_str(), db.env, db.sanitize_path()), ("app", DbEnv::Url, Some(DEFAULT_SANITIZE)));
        let m = Manifest::parse(
            "run = \"x\"\n[database]\nengine = \"mysql\"\nname = \"drupal\"\nenv = \"vars\"\nsanitize = false\n",
        )
        .unwrap();
        let db = m.database.unwrap();
        assert_eq!((db.engine, db.env, db.sanitize_path()), (wakegate_db::Engine::Mariadb, DbEnv::Vars, None));
        for bad in [
            "engine = \"oracle\"",
            "engine = \"postgres\"\nname = \"a-b\"",
            "engine = \"postgres\"\nsanitize = \"../x.sql\"",
        ] {
            assert!(Manifest::parse(&format!("run = \"x\"\n[database]\n{bad}\n")).is_err(), "{bad}");
        }
    }
}
