//! The git operations the provisioner needs, through the `git` command (any URL git
//! understands: file://, https://, git://, ssh). Whether a ref still exists is waker's
//! question (`wakegate_waker::refs`).

use std::path::Path;
use std::time::Duration;
use tokio::process::Command;

const GIT_TIMEOUT: Duration = Duration::from_secs(120);

/// Credentials for a private repository over HTTPS (a forge token), given to git only
/// for `origin` (`https://host[:port]`).
#[derive(Clone)]
pub struct GitAuth {
    pub origin: String,
    pub username: String,
    pub token: String,
}

impl std::fmt::Debug for GitAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitAuth")
            .field("origin", &self.origin)
            .field("username", &self.username)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// The environment variables the credential helper reads.
pub const ENV_USERNAME: &str = "WAKEGATE_GIT_USERNAME";
pub const ENV_TOKEN: &str = "WAKEGATE_GIT_TOKEN";
/// A credential helper that answers `get` from the environment: the token is never in
/// a URL, an argument or `.git/config`. The empty helper first drops any inherited ones,
/// so nothing stores it.
pub const CREDENTIAL_HELPER: &str = r#"!f() { test "$1" = get || exit 0; echo "username=${WAKEGATE_GIT_USERNAME}"; echo "password=${WAKEGATE_GIT_TOKEN}"; }; f"#;

/// `git` with `auth`'s credentials available to it.
fn command(dir: Option<&Path>, auth: Option<&GitAuth>) -> Command {
    let mut cmd = Command::new("git");
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    if let Some(auth) = auth {
        // answered for the repository's host only: a redirect elsewhere gets nothing
        cmd.args(["-c", "credential.helper=", "-c"])
            .arg(format!("credential.{}.helper={CREDENTIAL_HELPER}", auth.origin))
            .env(ENV_USERNAME, &auth.username)
            .env(ENV_TOKEN, &auth.token);
    }
    cmd.env("GIT_TERMINAL_PROMPT", "0").kill_on_drop(true);
    cmd
}

async fn run(dir: Option<&Path>, args: &[&str]) -> Result<String, String> {
    run_with(dir, args, None).await
}

async fn run_with(dir: Option<&Path>, args: &[&str], auth: Option<&GitAuth>) -> Result<String, String> {
    let mut cmd = command(dir, auth);
    cmd.args(args);
    let out = tokio::time::timeout(GIT_TIMEOUT, cmd.output())
        .await
        .map_err(|_| format!("git {} timed out", args.first().unwrap_or(&"")))?
        .map_err(|e| format!("cannot run git: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Fetches `git_ref` from `url` into a new repository at `dir` and checks it out.
pub async fn checkout(url: &str, git_ref: &str, dir: &Path, auth: Option<&GitAuth>) -> Result<(), String> {
    tokio::fs::create_dir_all(dir).await.map_err(|e| e.to_string())?;
    run(Some(dir), &["init", "-q"]).await?;
    run_with(Some(dir), &["fetch", "-q", "--depth", "1", "--", url, git_ref], auth)
        .await
        .map_err(|e| format!("cannot fetch {git_ref}: {e}"))?;
    run(Some(dir), &["checkout", "-q", "--detach", "FETCH_HEAD"]).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_in_the_environment_only() {
        let auth =
            GitAuth { origin: "https://git.example".into(), username: "oauth2".into(), token: "glpat-SECRET".into() };
        let cmd = command(None, Some(&auth));
        let std = cmd.as_std();
        let args: Vec<String> = std.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(args.iter().all(|a| !a.contains("glpat-SECRET")), "{args:?}");
        assert!(args.contains(&"credential.helper=".to_string()));
        let env: Vec<_> = std.get_envs().filter_map(|(k, v)| Some((k.to_str()?, v?.to_str()?))).collect();
        assert!(env.contains(&(ENV_TOKEN, "glpat-SECRET")));
        assert!(!format!("{auth:?}").contains("SECRET"));
    }

    #[tokio::test]
    async fn the_helper_answers_git_with_the_token() {
        // git asks the helper as it would for an HTTPS remote; what it hears back is the
        // environment's token
        let auth = GitAuth {
            origin: "https://git.example".into(),
            username: "x-access-token".into(),
            token: "ghs_TOKEN".into(),
        };
        let mut cmd = command(None, Some(&auth));
        cmd.args(["credential", "fill"]).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"protocol=https\nhost=git.example\n\n").await.unwrap();
        drop(stdin);
        let out = child.wait_with_output().await.unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("username=x-access-token") && text.contains("password=ghs_TOKEN"), "{text}");
        // another host gets nothing from it
        let mut cmd = command(None, Some(&auth));
        cmd.args(["credential", "fill"])
            .env("GIT_ASKPASS", "true")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"protocol=https\nhost=evil.example\n\n").await.unwrap();
        drop(stdin);
        let out = child.wait_with_output().await.unwrap();
        assert!(!String::from_utf8_lossy(&out.stdout).contains("ghs_TOKEN"));
    }
}
