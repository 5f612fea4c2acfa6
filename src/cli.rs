//! The operator's commands: `wakegate previews | projects | logs`, talking to a waker.
//!
//! Where the waker is and the token come from, first to last: `--server`/`--token`,
//! `WAKEGATE_WAKER_URL`/`WAKEGATE_OPERATOR_TOKEN` (or `_FILE`), then the config file
//! (`WAKEGATE_CONFIG`, else `$XDG_CONFIG_HOME/wakegate/config.toml`, else
//! `~/.config/wakegate/config.toml`):
//!
//! ```toml
//! server = "https://waker.internal:7001"
//! token_file = "/run/secrets/wakegate-operator"   # or token = "…"
//! ```

use crate::dbcli::{seg, Api};
use anyhow::{bail, Context};
use reqwest::Method;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

/// The waker and token flags every operator command takes.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct Target {
    /// The waker's URL (else WAKEGATE_WAKER_URL, else `server` in the config file).
    #[arg(long, global = true)]
    pub server: Option<String>,
    /// The operator token (else WAKEGATE_OPERATOR_TOKEN(_FILE), else `token` or
    /// `token_file` in the config file).
    #[arg(long, global = true)]
    pub token: Option<String>,
}

/// The config file's settings.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    server: Option<String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
}

/// Where the config file is looked for.
pub fn config_path() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("WAKEGATE_CONFIG")
        .or_else(|| env("XDG_CONFIG_HOME").map(|d| d.join("wakegate/config.toml")))
        .or_else(|| env("HOME").map(|h| h.join(".config/wakegate/config.toml")))
}

fn read_config() -> anyhow::Result<(FileConfig, Option<PathBuf>)> {
    let Some(path) = config_path() else { return Ok((FileConfig::default(), None)) };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let cfg = toml::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
            Ok((cfg, Some(path)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((FileConfig::default(), None)),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

impl Target {
    /// The API client, from flags, then `cfg` (the environment), then the config file.
    pub fn api(&self, cfg: &crate::config::Config) -> anyhow::Result<Api> {
        // the file is read only when a flag leaves something to find
        let (file, path) = match (&self.server, &self.token) {
            (Some(_), Some(_)) => (FileConfig::default(), None),
            _ => read_config()?,
        };
        let server = self
            .server
            .clone()
            .or_else(|| std::env::var("WAKEGATE_WAKER_URL").ok().filter(|s| !s.is_empty()))
            .or(file.server)
            .unwrap_or_else(|| cfg.waker_url.clone());
        let token = match (&self.token, &cfg.operator_token, &file.token, &file.token_file) {
            (Some(t), _, _, _) | (None, Some(t), _, _) | (None, None, Some(t), _) => t.clone(),
            (None, None, None, Some(f)) => std::fs::read_to_string(f)
                .with_context(|| format!("reading token_file {}", f.display()))?
                .trim()
                .to_string(),
            (None, None, None, None) => bail!(
                "no operator token: pass --token, set WAKEGATE_OPERATOR_TOKEN, or put token = \"…\" in {}",
                path.or_else(config_path).map(|p| p.display().to_string()).unwrap_or("the config file".into())
            ),
        };
        if !server.starts_with("http://") && !server.starts_with("https://") {
            bail!("the server must be an http:// or https:// URL, not {server:?}");
        }
        Api::new(&server, &token)
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum PreviewCmd {
    /// Every preview as a table (project, ref, state, URL, TTL left, last visit).
    Ls {
        /// Only this project's.
        #[arg(long)]
        project: Option<String>,
        /// The previews as JSON, as the API gives them.
        #[arg(long)]
        json: bool,
    },
    /// One preview, all it says.
    Show {
        /// An id (`pv-…`) or `project/ref`.
        preview: String,
        #[arg(long)]
        json: bool,
    },
    /// The preview of a ref, created and built if there is none.
    Create { project: String, git_ref: String },
    /// Keeps a preview past its TTL until unpinned.
    Pin { preview: String },
    /// Lets its TTL count again.
    Unpin { preview: String },
    /// Sets its TTL in hours (from its last deploy), or `project` for the project's.
    Ttl { preview: String, hours: String },
    /// Puts a running preview to sleep.
    Sleep { preview: String },
    /// Wakes a sleeping preview.
    Wake {
        preview: String,
        /// Waits until it runs (or fails).
        #[arg(long)]
        wait: bool,
    },
    /// Erases its machine; its URL offers a rebuild.
    Erase { preview: String },
    /// Builds it again from its ref.
    Rebuild {
        preview: String,
        /// Waits until it runs (or fails).
        #[arg(long)]
        wait: bool,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum ProjectCmd {
    /// Every project.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// One project.
    Show { name: String },
    /// Creates a project.
    Create {
        name: String,
        git_url: String,
        /// Its previews' TTL (hours; default 72).
        #[arg(long)]
        ttl_hours: Option<f64>,
        /// A preview idle this long sleeps (seconds; default 1800).
        #[arg(long)]
        idle_timeout_secs: Option<u64>,
        /// The org it belongs to (default `default`).
        #[arg(long)]
        org: Option<String>,
    },
}

/// Which logs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Streams {
    Build,
    App,
    All,
}

/// The preview a user names: an id, or `project/ref` looked up.
pub async fn resolve(api: &Api, name: &str) -> anyhow::Result<String> {
    let Some((project, git_ref)) = name.split_once('/') else {
        if name.starts_with("pv-") {
            return Ok(name.to_string());
        }
        bail!("name a preview by its id (pv-…) or as project/ref, e.g. demo/main");
    };
    let git_ref = wakegate_core::gitref::normalize(git_ref).map_err(|e| anyhow::anyhow!("{git_ref:?}: {e}"))?;
    let all = api.ok(Method::GET, "/v1/previews", None).await?;
    let found = all
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["project"].as_str() == Some(project) && p["git_ref"].as_str() == Some(&git_ref));
    match found.and_then(|p| p["id"].as_str()) {
        Some(id) => Ok(id.to_string()),
        None => bail!("no preview of {git_ref} in project {project} (see `wakegate previews ls`)"),
    }
}

/// `3 min ago`, `2 h ago`, `just now`.
pub fn ago(then_ms: u64, now_ms: u64) -> String {
    let s = now_ms.saturating_sub(then_ms) / 1000;
    match s {
        0..=9 => "just now".into(),
        10..=59 => format!("{s} s ago"),
        60..=3599 => format!("{} min ago", s / 60),
        3600..=86_399 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

fn state_of(p: &Value) -> String {
    let state = p["state"].as_str().unwrap_or("?");
    match p["phase"].as_str() {
        Some(phase) if state == "building" || state == "failed" => format!("{state} ({phase})"),
        _ => state.to_string(),
    }
}

/// The previews as a table for a terminal.
pub fn table(previews: &[Value], now_ms: u64) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Dynamic)
        .set_header(["PROJECT", "REF", "STATE", "URL", "TTL LEFT", "LAST VISIT"]);
    for p in previews {
        let ttl = if p["pinned"].as_bool() == Some(true) {
            "pinned".to_string()
        } else {
            p["ttl_remaining"].as_str().unwrap_or("—").to_string()
        };
        let visit = p["last_visit_at"].as_u64().map(|t| ago(t, now_ms)).unwrap_or_else(|| "never".into());
        t.add_row([
            p["project"].as_str().unwrap_or(""),
            p["git_ref"].as_str().unwrap_or(""),
            &state_of(p),
            p["url"].as_str().unwrap_or(""),
            &ttl,
            &visit,
        ]);
    }
    t.to_string()
}

/// Hours as people write them: `12 h`, `2.5 h`.
fn in_hours(v: &Value) -> String {
    match v.as_f64() {
        Some(h) if h.fract() == 0.0 => format!("{h:.0} h"),
        Some(h) => format!("{h} h"),
        None => "—".into(),
    }
}

fn now_ms() -> u64 {
    wakegate_store::now_ms()
}

/// Waits until a preview runs or fails (bounded by `limit`), printing its states.
async fn wait_settled(api: &Api, id: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut last = String::new();
    loop {
        let p = api.ok(Method::GET, &format!("/v1/previews/{}", seg(id)), None).await?;
        let state = state_of(&p);
        if state != last {
            eprintln!("{id}: {state}");
            last = state;
        }
        match p["state"].as_str() {
            // a redeploy that failed leaves the old version running, and says why
            Some("running") if !p["last_error"].is_null() => {
                bail!(
                    "{id}: the new version failed; the old one still runs: {}",
                    p["last_error"].as_str().unwrap_or("")
                )
            }
            Some("running") => {
                println!("{}", p["url"].as_str().unwrap_or(""));
                return Ok(());
            }
            Some("failed") => bail!("{id} failed: {}", p["reason"].as_str().unwrap_or("no reason given")),
            Some("erased" | "gone") => bail!("{id} is {}", p["state"].as_str().unwrap_or("")),
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("{id} is still {last} after {} s", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One line saying what an action left the preview as.
fn said(verb: &str, p: &Value) -> String {
    let name = format!("{}/{}", p["project"].as_str().unwrap_or("?"), p["git_ref"].as_str().unwrap_or("?"));
    format!("{name}: {verb} ({})", state_of(p))
}

pub async fn previews(api: &Api, cmd: PreviewCmd) -> anyhow::Result<()> {
    let path = |id: &str, rest: &str| format!("/v1/previews/{}{rest}", seg(id));
    match cmd {
        PreviewCmd::Ls { project, json } => {
            let all = api.ok(Method::GET, "/v1/previews", None).await?;
            let mut list: Vec<Value> = all.as_array().cloned().unwrap_or_default();
            if let Some(project) = &project {
                list.retain(|p| p["project"].as_str() == Some(project));
            }
            list.sort_by(|a, b| {
                (a["project"].as_str(), a["git_ref"].as_str()).cmp(&(b["project"].as_str(), b["git_ref"].as_str()))
            });
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                eprintln!("no previews");
            } else {
                println!("{}", table(&list, now_ms()));
            }
        }
        PreviewCmd::Show { preview, json } => {
            let id = resolve(api, &preview).await?;
            let p = api.ok(Method::GET, &path(&id, ""), None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                let now = now_ms();
                let time = |k: &str| p[k].as_u64().map(|t| ago(t, now)).unwrap_or_else(|| "never".into());
                let mut lines = vec![
                    ("id", p["id"].as_str().unwrap_or("").to_string()),
                    ("project", p["project"].as_str().unwrap_or("").to_string()),
                    ("ref", p["git_ref"].as_str().unwrap_or("").to_string()),
                    ("state", state_of(&p)),
                    ("url", p["url"].as_str().unwrap_or("").to_string()),
                ];
                for u in p["custom_urls"].as_array().into_iter().flatten() {
                    lines.push(("also at", u.as_str().unwrap_or("").to_string()));
                }
                lines.extend([
                    ("created", time("created_at")),
                    ("last deploy", time("deployed_at")),
                    ("last visit", time("last_visit_at")),
                    ("TTL", in_hours(&p["ttl_hours"])),
                    (
                        "TTL left",
                        if p["pinned"] == true {
                            "pinned".into()
                        } else {
                            p["ttl_remaining"].as_str().unwrap_or("—").into()
                        },
                    ),
                ]);
                if let Some(r) = p["reason"].as_str() {
                    lines.push(("reason", r.to_string()));
                }
                if let Some(e) = p["last_error"].as_str() {
                    lines.push(("last error", e.to_string()));
                }
                for (k, v) in lines {
                    println!("{k:<12} {v}");
                }
            }
        }
        PreviewCmd::Create { project, git_ref } => {
            let p = api
                .ok(Method::POST, &format!("/v1/projects/{}/previews", seg(&project)), Some(json!({ "ref": git_ref })))
                .await?;
            println!("{}", said("created", &p));
            println!("{}", p["url"].as_str().unwrap_or(""));
        }
        PreviewCmd::Pin { preview } => {
            let id = resolve(api, &preview).await?;
            println!("{}", said("pinned", &api.ok(Method::POST, &path(&id, "/pin"), None).await?));
        }
        PreviewCmd::Unpin { preview } => {
            let id = resolve(api, &preview).await?;
            let p = api.ok(Method::POST, &path(&id, "/unpin"), None).await?;
            println!("{}, {} left", said("unpinned", &p), p["ttl_remaining"].as_str().unwrap_or("—"));
        }
        PreviewCmd::Ttl { preview, hours } => {
            let id = resolve(api, &preview).await?;
            let ttl = if hours == "project" {
                Value::Null
            } else {
                let h = hours
                    .parse::<f64>()
                    .ok()
                    .filter(|h| h.is_finite())
                    .ok_or_else(|| anyhow::anyhow!("hours must be a number or `project`"))?;
                json!(h)
            };
            let p = api.ok(Method::PUT, &path(&id, "/ttl"), Some(json!({ "ttl_hours": ttl }))).await?;
            let left = p["ttl_remaining"].as_str().unwrap_or("—");
            println!("{}, {left} left", said(&format!("TTL {}", in_hours(&p["ttl_hours"])), &p));
        }
        PreviewCmd::Sleep { preview } => {
            let id = resolve(api, &preview).await?;
            println!("{}", said("going to sleep", &api.ok(Method::POST, &path(&id, "/sleep"), None).await?));
        }
        PreviewCmd::Wake { preview, wait } => {
            let id = resolve(api, &preview).await?;
            println!("{}", said("waking", &api.ok(Method::POST, &path(&id, "/wake"), None).await?));
            if wait {
                wait_settled(api, &id, Duration::from_secs(15 * 60)).await?;
            }
        }
        PreviewCmd::Erase { preview } => {
            let id = resolve(api, &preview).await?;
            println!("{}", said("erasing", &api.ok(Method::POST, &path(&id, "/erase"), None).await?));
        }
        PreviewCmd::Rebuild { preview, wait } => {
            let id = resolve(api, &preview).await?;
            let a = api.ok(Method::POST, &path(&id, "/rebuild"), None).await?;
            println!("{preview}: rebuilding ({})", a["state"].as_str().unwrap_or("?"));
            if wait {
                wait_settled(api, &id, Duration::from_secs(60 * 60)).await?;
            }
        }
    }
    Ok(())
}

pub async fn projects(api: &Api, cmd: ProjectCmd) -> anyhow::Result<()> {
    match cmd {
        ProjectCmd::Ls { json } => {
            let all = api.ok(Method::GET, "/v1/projects", None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
                return Ok(());
            }
            let mut t = comfy_table::Table::new();
            t.load_preset(comfy_table::presets::NOTHING).set_header(["NAME", "GIT URL", "TTL", "IDLE SLEEP"]);
            for p in all.as_array().into_iter().flatten() {
                t.add_row([
                    p["name"].as_str().unwrap_or("").to_string(),
                    p["git_url"].as_str().unwrap_or("").to_string(),
                    in_hours(&p["ttl_hours"]),
                    format!("{} s", p["idle_timeout_secs"]),
                ]);
            }
            println!("{t}");
        }
        ProjectCmd::Show { name } => {
            let p = api.ok(Method::GET, &format!("/v1/projects/{}", seg(&name)), None).await?;
            println!("{}", serde_json::to_string_pretty(&p)?);
        }
        ProjectCmd::Create { name, git_url, ttl_hours, idle_timeout_secs, org } => {
            let mut body = json!({ "name": name, "git_url": git_url });
            if let Some(h) = ttl_hours {
                body["ttl_hours"] = json!(h);
            }
            if let Some(s) = idle_timeout_secs {
                body["idle_timeout_secs"] = json!(s);
            }
            if let Some(o) = org {
                body["org"] = json!(o);
            }
            let p = api.ok(Method::POST, "/v1/projects", Some(body)).await?;
            println!("project {} created", p["name"].as_str().unwrap_or(""));
        }
    }
    Ok(())
}

/// Prints a preview's logs; with `follow`, goes on printing what comes until
/// interrupted (a waker that does not answer for a while is asked again).
pub async fn logs(api: &Api, preview: &str, which: Streams, follow: bool) -> anyhow::Result<()> {
    use std::io::{IsTerminal, Write};
    let id = resolve(api, preview).await?;
    let streams: &[&str] = match which {
        Streams::Build => &["build"],
        Streams::App => &["app"],
        Streams::All => &["build", "app"],
    };
    let terminal = std::io::stdout().is_terminal();
    let mut from = vec![0u64; streams.len()];
    let mut shown: Option<usize> = None;
    let mut at_line_start = true;
    let labelled = streams.len() > 1;
    loop {
        for (i, stream) in streams.iter().enumerate() {
            let path = format!("/v1/previews/{}/logs?stream={stream}&from={}", seg(&id), from[i]);
            let s = match api.ok(Method::GET, &path, None).await {
                Ok(s) => s,
                Err(e) if follow => {
                    eprintln!("[{e:#}; asking again]");
                    tokio::time::sleep(FOLLOW_EVERY * 5).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let (start, end) = (s["start"].as_u64().unwrap_or(0), s["end"].as_u64().unwrap_or(0));
            let text = s["text"].as_str().unwrap_or("");
            if end < from[i] {
                // the log was dropped (an erase) and begins again
                from[i] = 0;
                continue;
            }
            if text.is_empty() {
                continue;
            }
            let mut out = std::io::stdout().lock();
            if labelled && shown != Some(i) {
                if !at_line_start {
                    writeln!(out)?;
                }
                writeln!(out, "==> {stream} <==")?;
                shown = Some(i);
            }
            if start > from[i] {
                writeln!(out, "[… {} earlier bytes no longer kept]", start - from[i])?;
            }
            // a terminal gets colours, never other escapes (titles, clipboard, links)
            let text = if terminal { printable(text) } else { text.to_string() };
            out.write_all(text.as_bytes())?;
            at_line_start = text.ends_with('\n');
            out.flush()?;
            from[i] = end;
        }
        if !follow {
            if !at_line_start {
                println!();
            }
            return Ok(());
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}

/// How often `logs --follow` asks for more.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// Log text safe for a terminal: colour (SGR) sequences stay; other escape sequences
/// and control characters but newline and tab are dropped.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' if chars.peek() == Some(&'[') => {
                chars.next();
                let mut seq = String::from("\u{1b}[");
                let mut end = None;
                for c in chars.by_ref() {
                    seq.push(c);
                    if ('@'..='~').contains(&c) {
                        end = Some(c);
                        break;
                    }
                }
                if end == Some('m') && seq[2..seq.len() - 1].chars().all(|c| c.is_ascii_digit() || c == ';') {
                    out.push_str(&seq);
                }
            }
            '\u{1b}' => {
                // OSC and the like: up to BEL or ESC \
                if chars.peek() == Some(&']') {
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' || (c == '\u{1b}' && chars.next_if_eq(&'\\').is_some()) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_keep_colours_and_drop_other_escapes() {
        let hostile = "\u{1b}[31mred\u{1b}[0m \u{1b}]52;c;ZXZpbA==\u{7}\u{1b}]0;title\u{1b}\\\u{1b}[2J\rok\u{8}\n\tend";
        assert_eq!(printable(hostile), "\u{1b}[31mred\u{1b}[0m ok\n\tend");
    }

    #[test]
    fn times_and_hours_read_as_people_write_them() {
        assert_eq!(ago(0, 5_000), "just now");
        assert_eq!(ago(0, 150_000), "2 min ago");
        assert_eq!(ago(0, 7_200_000), "2 h ago");
        assert_eq!(ago(10, 0), "just now", "a clock behind is not the future");
        assert_eq!(in_hours(&json!(12.0)), "12 h");
        assert_eq!(in_hours(&json!(2.5)), "2.5 h");
    }
}
