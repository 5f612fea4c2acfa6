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

/// Names the engines keep for themselves.
pub const RESERVED_DB_NAMES: &[&str] =
    &["postgres", "template0", "template1", "mysql", "information_schema", "performance_schema", "sys"];

/// A database name the agents and the local backend take (the same rule as
/// `wakegate.toml`'s `database.name`).
pub fn check_db_name(n: &str) -> Result<(), String> {
    // lower case only: PostgreSQL folds unquoted names, and clients name the database
    // as written
    if n.is_empty()
        || n.len() > 63
        || !n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        || n.as_bytes()[0].is_ascii_digit()
    {
        return Err("database.name must be 1–63 characters of a-z, 0-9 and '_', not starting with a digit".into());
    }
    if RESERVED_DB_NAMES.contains(&n) {
        return Err(format!("database.name cannot be {n}: the server keeps that name for itself"));
    }
    Ok(())
}

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
        check_db_name(&self.name).map_err(|e| format!("{FILE}: {e}"))?;
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
            "engine = \"postgres\"\nname = \"MyApp\"",
            "engine = \"postgres\"\nname = \"template1\"",
            "engine = \"postgres\"\nsanitize = \"../x.sql\"",
        ] {
            assert!(Manifest::parse(&format!("run = \"x\"\n[database]\n{bad}\n")).is_err(), "{bad}");
        }
    }

    /// The agent on Hetzner machines reads wakegate.toml itself (Python): it must take
    /// and refuse the same `[database]` tables as this parser.
    #[test]
    fn the_agent_checks_database_tables_as_this_parser_does() {
        let cases = [
            "engine = \"postgres\"",
            "engine = \"mysql\"\nname = \"drupal\"\nenv = \"vars\"\nsanitize = false",
            "engine = \"mariadb\"\nsanitize = \"sql/clean.sql\"",
            "engine = \"mariadb\"\nsanitize = true",
            "engine = \"oracle\"",
            "engine = [\"postgres\"]",
            "name = \"app\"",
            "engine = \"postgres\"\nname = \"a-b\"",
            "engine = \"postgres\"\nname = \"MyApp\"",
            "engine = \"postgres\"\nname = \"9lives\"",
            "engine = \"postgres\"\nname = \"\"",
            "engine = \"postgres\"\nname = \"mysql\"",
            "engine = \"postgres\"\nname = 7",
            "engine = \"postgres\"\nenv = \"both\"",
            "engine = \"postgres\"\nsanitize = \"../x.sql\"",
            "engine = \"postgres\"\nsanitize = \"/etc/x.sql\"",
            "engine = \"postgres\"\nsanitize = \"\"",
            "engine = \"postgres\"\nextra = 1",
        ];
        let dir = std::env::temp_dir().join(format!("wakegate-agent-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let agent = dir.join("agent.py");
        std::fs::write(&agent, crate::hetzner::userdata::AGENT).unwrap();
        let cfg = dir.join("agent.json");
        std::fs::write(&cfg, r#"{"control": "http://127.0.0.1:1", "machine": "m", "token": "t"}"#).unwrap();
        let script = r#"
import importlib.util, json, sys, tomllib
sys.argv = ["agent", sys.argv[2]]
spec = importlib.util.spec_from_file_location("agent", AGENT)
"#
        .replace("AGENT", &format!("{:?}", agent.to_string_lossy()))
            + r#"
agent = importlib.util.module_from_spec(spec)
spec.loader.exec_module(agent)
for case in json.load(sys.stdin):
    try:
        agent.database({"database": tomllib.loads(case)})
        print("ok")
    except agent.Failed:
        print("refused")
"#;
        let mut child = std::process::Command::new("python3")
            .args(["-c", &script, "-", cfg.to_str().unwrap()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(serde_json::to_string(&cases).unwrap().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let agent_says: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(String::from).collect();
        for (case, says) in cases.iter().zip(&agent_says) {
            let rust = Manifest::parse(&format!("run = \"x\"\n[database]\n{case}\n"));
            let rust_says = if rust.is_ok() { "ok" } else { "refused" };
            assert_eq!(says, rust_says, "{case:?}: the agent says {says}, the parser {rust:?}");
        }
        assert_eq!(agent_says.len(), cases.len());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
