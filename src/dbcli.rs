//! `wakegate db`: a project's database dumps, through the waker's operator API.
//!
//! `push` streams a `.sql` or `.sql.gz` (a file, or `-` for stdin) to S3 as a multipart
//! upload through presigned part URLs, one part in memory at a time, with a progress
//! bar (bytes, rate, ETA) on a terminal. The SHA-256 is computed while sending, and the
//! same checks the waker runs afterwards run here too, so a cut or corrupt dump is
//! refused before it is completed. An upload of a file that was interrupted is resumed
//! by the next `push` of the same file: parts already in S3 whose MD5 matches are not
//! sent again.
//!
//! `pull` has the provisioner dump a running preview's database into S3 as `.sql.gz`
//! (waking the preview first if it sleeps), downloads it through a presigned URL with a
//! progress bar, and then has the object removed.

use anyhow::{bail, Context};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use wakegate_db::check::Checker;
use wakegate_db::Engine;

pub struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

/// Tries at each part before giving up (the next `push` resumes).
const PART_TRIES: u32 = 5;

impl Api {
    pub fn new(base: &str, token: &str) -> anyhow::Result<Api> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Api { base: base.trim_end_matches('/').to_string(), token: token.to_string(), http })
    }

    pub async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<(u16, Value)> {
        let mut req = self.http.request(method.clone(), format!("{}{path}", self.base)).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| {
            // the innermost cause says what happened (connection refused, no such host)
            let mut cause: &dyn std::error::Error = &e;
            while let Some(next) = cause.source() {
                cause = next;
            }
            anyhow::anyhow!(
                "cannot reach the waker at {}: {cause} (is it running? set --server or WAKEGATE_WAKER_URL)",
                self.base
            )
        })?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await?;
        let json = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
        if status == 401 {
            bail!("the waker refused the operator token (401): check --token or WAKEGATE_OPERATOR_TOKEN");
        }
        Ok((status, json))
    }

    /// A call that must succeed: its JSON, or the waker's error as the message.
    pub async fn ok(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let (status, v) = self.call(method, path, body).await?;
        if status >= 400 {
            let field = v["field"].as_str().map(|f| format!(" ({f})")).unwrap_or_default();
            bail!("{}{field}", v["error"].as_str().unwrap_or(&format!("the waker answered {status}")));
        }
        Ok(v)
    }
}

/// A path segment, percent-encoded.
pub fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What an interrupted push of a file left to resume.
#[derive(Serialize, Deserialize)]
struct Resume {
    dump: String,
    part_size: u64,
    /// Parts sent: number → (ETag S3 answered, MD5 of the bytes, size). Some
    /// S3-compatible stores list parts without ETags; this says which bytes they hold.
    #[serde(default)]
    sent: std::collections::BTreeMap<i64, (String, String, u64)>,
}

fn resume_file(base: &str, project: &str, path: &Path, meta: &std::fs::Metadata) -> Option<PathBuf> {
    let dir = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?
        .join("wakegate/uploads");
    let mtime = meta.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos();
    let abs = std::path::absolute(path).ok()?;
    let key = format!("{base}\n{project}\n{}\n{}\n{mtime}", abs.display(), meta.len());
    Some(dir.join(format!("{}.json", hex::encode(&sha2::Sha256::digest(key.as_bytes())[..16]))))
}

use md5::Digest as _;

fn progress_bar(total: Option<u64>) -> indicatif::ProgressBar {
    let (bar, style) = match total {
        Some(t) => {
            (indicatif::ProgressBar::new(t), "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}")
        }
        None => (indicatif::ProgressBar::new_spinner(), "{msg} {spinner} {bytes} {binary_bytes_per_sec}"),
    };
    bar.set_style(indicatif::ProgressStyle::with_template(style).expect("valid template").progress_chars("=> "));
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr_with_hz(4));
    bar
}

/// Reads up to `n` bytes (less only at the end).
async fn read_part(r: &mut (dyn tokio::io::AsyncRead + Unpin + Send), n: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(n);
    while buf.len() < n {
        let got = r.take((n - buf.len()) as u64).read_to_end(&mut buf).await?;
        if got == 0 {
            break;
        }
    }
    Ok(buf)
}

pub struct Push<'a> {
    pub project: &'a str,
    pub file: &'a str,
    pub engine: Option<&'a str>,
    pub target: Option<&'a str>,
}

pub async fn push(api: &Api, p: Push<'_>) -> anyhow::Result<()> {
    let project = seg(p.project);
    let (mut reader, size, name, resume_at): (Box<dyn tokio::io::AsyncRead + Unpin + Send>, _, _, _) = if p.file == "-"
    {
        (Box::new(tokio::io::stdin()), None, "-".to_string(), None)
    } else {
        let path = Path::new(p.file);
        let f = tokio::fs::File::open(path).await.with_context(|| format!("cannot open {}", p.file))?;
        let meta = f.metadata().await?;
        if !meta.is_file() {
            bail!("{} is not a file", p.file);
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| p.file.into());
        (
            Box::new(tokio::io::BufReader::with_capacity(1 << 20, f)),
            Some(meta.len()),
            name,
            resume_file(&api.base, p.project, path, &meta),
        )
    };

    // resume an earlier push of this very file, if its upload is still open
    let mut resumed: Option<(Resume, Vec<Value>, Value)> = None;
    if let Some(state) = resume_at.as_ref().and_then(|f| std::fs::read(f).ok()) {
        if let Ok(r) = serde_json::from_slice::<Resume>(&state) {
            let (s, d) =
                api.call(reqwest::Method::GET, &format!("/v1/projects/{project}/dumps/{}", seg(&r.dump)), None).await?;
            if s == 200 && d["state"] == "uploading" {
                let parts = api
                    .ok(reqwest::Method::GET, &format!("/v1/projects/{project}/dumps/{}/parts", seg(&r.dump)), None)
                    .await?;
                resumed = Some((r, parts.as_array().cloned().unwrap_or_default(), d));
            }
        }
    }
    let (mut state, engine, done_parts) = match resumed {
        Some((r, parts, d)) => {
            eprintln!(
                "resuming the upload of {} ({} part(s) already in S3)",
                d["id"].as_str().unwrap_or(""),
                parts.len()
            );
            let engine = d["engine"].as_str().and_then(Engine::parse).context("the dump has no engine")?;
            (r, engine, parts)
        }
        None => {
            let started = api
                .ok(
                    reqwest::Method::POST,
                    &format!("/v1/projects/{project}/dumps"),
                    Some(json!({ "name": name, "engine": p.engine, "size": size, "target": p.target })),
                )
                .await?;
            let id = started["dump"]["id"].as_str().context("no dump id in the answer")?.to_string();
            let part_size = started["part_size"].as_u64().context("no part size in the answer")?;
            let engine =
                started["dump"]["engine"].as_str().and_then(Engine::parse).context("no engine in the answer")?;
            (Resume { dump: id, part_size, sent: Default::default() }, engine, Vec::new())
        }
    };
    // without its state a push still works; it only cannot be resumed
    let save = |state: &Resume| {
        let Some(f) = &resume_at else { return };
        let written = f
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(f, serde_json::to_vec(state).unwrap_or_default()));
        if let Err(e) = written {
            eprintln!("warning: cannot record the upload in {} ({e}): it cannot be resumed", f.display());
        }
    };
    let forget = || {
        if let Some(f) = &resume_at {
            match std::fs::remove_file(f) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    eprintln!("warning: cannot remove {} ({e})", f.display())
                }
                _ => {}
            }
        }
    };
    save(&state);
    let (dump_id, part_size) = (state.dump.clone(), state.part_size);
    let dump_path = format!("/v1/projects/{project}/dumps/{}", seg(&dump_id));
    // what S3 holds: number → (ETag, size)
    let have: std::collections::HashMap<i64, (String, u64)> = done_parts
        .iter()
        .filter_map(|v| {
            let etag = v["etag"].as_str().unwrap_or("").trim_matches('"').to_string();
            Some((v["number"].as_i64()?, (etag, v["size"].as_u64()?)))
        })
        .collect();

    let bar = progress_bar(size);
    bar.set_message(format!("pushing {name}"));
    let mut checker = Checker::new(engine);
    let mut number = 0i64;
    let mut sent = 0u64;
    loop {
        let part = read_part(&mut reader, part_size as usize).await.context("reading the dump")?;
        if part.is_empty() && number > 0 {
            break;
        }
        number += 1;
        let len = part.len() as u64;
        let part = bytes::Bytes::from(part);
        let hashed = {
            let part = part.clone();
            let mut c = checker;
            tokio::task::spawn_blocking(move || {
                c.update(&part);
                let md5 = hex::encode(md5::Md5::digest(&part));
                (c, md5)
            })
            .await?
        };
        checker = hashed.0;
        let md5 = hashed.1;
        // a part is there when S3 holds it at this size and its ETag (or what this
        // machine recorded sending) is the MD5 of these bytes
        let recorded = state.sent.get(&number).is_some_and(|(_, m, _)| *m == md5);
        let there = have.get(&number).is_some_and(|(etag, size)| *size == len && (*etag == md5 || recorded));
        if there {
            state.sent.entry(number).or_insert_with(|| (format!("\"{md5}\""), md5.clone(), len));
            bar.inc(len);
        } else {
            let etag = put_part(api, &dump_path, number, part, &bar).await?;
            state.sent.insert(number, (etag, md5, len));
            save(&state);
        }
        sent += len;
        if len < part_size {
            break;
        }
    }
    bar.finish_and_clear();
    let checked = match tokio::task::spawn_blocking(move || checker.finish()).await? {
        Ok(c) => c,
        Err(reason) => {
            // nothing becomes of it: the upload is dropped
            if let Err(e) = api.ok(reqwest::Method::DELETE, &dump_path, None).await {
                eprintln!("warning: dropping the upload of {dump_id} failed ({e}); `wakegate db rm` removes it");
            }
            forget();
            bail!("{name} was refused: {reason}");
        }
    };
    eprintln!("sent {} ({:.1} MB), sha256 {}", name, sent as f64 / 1e6, checked.sha256);
    let parts: Vec<Value> =
        state.sent.range(1..=number).map(|(n, (etag, _, _))| json!({"number": n, "etag": etag})).collect();
    let completion = json!({ "size": checked.size, "sha256": checked.sha256, "parts": parts });
    // the waker reads it back from S3 and checks it; asking again is how to wait
    // (and restarts a checker that stopped)
    let check_bar = progress_bar(Some(checked.size));
    check_bar.set_message("checking in S3");
    let done = loop {
        let (status, v) =
            api.call(reqwest::Method::POST, &format!("{dump_path}/complete"), Some(completion.clone())).await?;
        match status {
            200 => break Ok(()),
            202 => {
                check_bar.set_position(v["verified"].as_u64().unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            _ => break Err(v["error"].as_str().unwrap_or("the waker refused it").to_string()),
        }
    };
    check_bar.finish_and_clear();
    forget();
    if let Err(e) = done {
        bail!("{name}: {e}");
    }
    match p.target {
        Some(t) => println!("{dump_id}: checked; preview {t} is being rebuilt with it"),
        None => println!("{dump_id}: checked; it is now the base of {}", p.project),
    }
    Ok(())
}

/// PUTs one part to its presigned URL, with retries; the bar moves as bytes go out.
async fn put_part(
    api: &Api,
    dump_path: &str,
    number: i64,
    part: bytes::Bytes,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<String> {
    let len = part.len() as u64;
    let mut last = String::new();
    for attempt in 0..PART_TRIES {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
        }
        let url = api.ok(reqwest::Method::POST, &format!("{dump_path}/parts/{number}"), None).await?;
        let url = url["url"].as_str().context("no URL for the part")?.to_string();
        let start = bar.position();
        let chunks: Vec<bytes::Bytes> =
            (0..part.len()).step_by(64 << 10).map(|i| part.slice(i..(i + (64 << 10)).min(part.len()))).collect();
        let b = bar.clone();
        let body = futures_util::stream::iter(chunks).map(move |c| {
            b.inc(c.len() as u64);
            Ok::<_, std::io::Error>(c)
        });
        let r = api
            .http
            .put(&url)
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(reqwest::Body::wrap_stream(body))
            .timeout(Duration::from_secs(600))
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => {
                let etag = resp.headers().get(reqwest::header::ETAG).and_then(|v| v.to_str().ok()).unwrap_or_default();
                return Ok(etag.to_string());
            }
            Ok(resp) => last = format!("S3 answered {} for part {number}", resp.status()),
            Err(e) => last = format!("sending part {number}: {e}"),
        }
        bar.set_position(start);
    }
    bail!("{last} (run the same push again to resume)")
}

pub async fn list(api: &Api, project: &str) -> anyhow::Result<()> {
    let v = api.ok(reqwest::Method::GET, &format!("/v1/projects/{}/dumps", seg(project)), None).await?;
    println!("{:<20} {:<9} {:<10} {:>10}  {:<20} NAME", "ID", "ENGINE", "STATE", "SIZE", "CREATED");
    for d in v["dumps"].as_array().into_iter().flatten() {
        let created = d["created_at"].as_u64().unwrap_or(0) / 1000;
        let mark = if d["base"] == true {
            " (base)"
        } else if d["target"].is_string() {
            " (one preview)"
        } else {
            ""
        };
        println!(
            "{:<20} {:<9} {:<10} {:>9.1}M  {:<20} {}{mark}",
            d["id"].as_str().unwrap_or(""),
            d["engine"].as_str().unwrap_or(""),
            d["state"].as_str().unwrap_or(""),
            d["size"].as_u64().unwrap_or(0) as f64 / 1e6,
            created,
            d["name"].as_str().unwrap_or(""),
        );
    }
    Ok(())
}

/// `1.2 GB`, `340.0 MB`, `12.0 kB`.
fn bytes(n: u64) -> String {
    match n {
        0..=999_999 => format!("{:.1} kB", n as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.2} GB", n as f64 / 1e9),
    }
}

/// `wakegate db images [project]`: every database image, and what uses it.
pub async fn images(api: &Api, project: Option<&str>) -> anyhow::Result<()> {
    let path = match project {
        Some(p) => format!("/v1/db/images?project={}", seg(p)),
        None => "/v1/db/images".to_string(),
    };
    let v = api.ok(reqwest::Method::GET, &path, None).await?;
    let now = wakegate_store::now_ms();
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Dynamic)
        .set_header(["IMAGE", "PROJECT", "ENGINE", "DUMP", "STATE", "SIZE", "AGE", "PREVIEWS"]);
    for i in v["images"].as_array().into_iter().flatten() {
        let state = match (i["state"].as_str().unwrap_or("?"), i["current"] == true) {
            ("ready", true) => "ready (current)".to_string(),
            ("failed", _) => format!("failed: {}", printable(i["reason"].as_str().unwrap_or("?"))),
            (s, _) => s.to_string(),
        };
        let previews: Vec<&str> = i["previews"].as_array().into_iter().flatten().filter_map(|p| p.as_str()).collect();
        t.add_row([
            i["id"].as_str().unwrap_or("").to_string(),
            i["project"].as_str().unwrap_or("").to_string(),
            format!("{} ({})", i["engine"].as_str().unwrap_or(""), i["version"].as_str().unwrap_or("")),
            i["dump"].as_str().unwrap_or("").to_string(),
            state,
            bytes(i["size"].as_u64().unwrap_or(0)),
            crate::cli::ago(i["created_at"].as_u64().unwrap_or(now), now),
            if previews.is_empty() { "-".to_string() } else { previews.join(" ") },
        ]);
    }
    println!("{t}");
    Ok(())
}

/// `wakegate db show <preview>`: where its database came from.
pub async fn show(api: &Api, preview: &str) -> anyhow::Result<()> {
    let v = api.ok(reqwest::Method::GET, &format!("/v1/previews/{}/db", seg(preview)), None).await?;
    print!("{}", describe(&v));
    Ok(())
}

fn describe(v: &Value) -> String {
    let mut out = String::new();
    let method = v["method"].as_str().unwrap_or("?");
    match v["image"].as_str() {
        Some(image) => out.push_str(&format!("image:     {image} ({method})\n")),
        None => out.push_str("image:     none (the dump was imported)\n"),
    }
    if let Some(d) = v["dump"].as_str() {
        out.push_str(&format!("dump:      {d}\n"));
    }
    if let Some(ms) = v["took_ms"].as_u64() {
        out.push_str(&format!("made in:   {ms} ms\n"));
    }
    if let Some(b) = v["diverged_bytes"].as_u64() {
        out.push_str(&format!("diverged:  {} from the image\n", bytes(b)));
    }
    if let Some(r) = v.get("refresh").filter(|r| r.is_object()) {
        let state = r["state"].as_str().unwrap_or("?");
        out.push_str(&format!("refresh:   {state}"));
        if let Some(reason) = r["reason"].as_str() {
            out.push_str(&format!(": {}", printable(reason)));
        }
        out.push('\n');
    }
    out
}

/// `wakegate db refresh <preview>`: its data made again from the current image.
pub async fn refresh(api: &Api, preview: &str, wait: bool) -> anyhow::Result<()> {
    let path = format!("/v1/previews/{}/db/refresh", seg(preview));
    let asked = api.ok(reqwest::Method::POST, &path, None).await?;
    if !wait {
        println!("refresh of {preview}'s data asked for ({})", asked["id"].as_str().unwrap_or("?"));
        return Ok(());
    }
    let id = asked["id"].as_str().unwrap_or_default().to_string();
    let bar = spinner(&format!("refreshing {preview}'s data"));
    let deadline = tokio::time::Instant::now() + PULL_WAIT;
    let done = loop {
        let v = api.ok(reqwest::Method::GET, &format!("/v1/previews/{}/db", seg(preview)), None).await?;
        let r = &v["refresh"];
        if r["id"].as_str() == Some(id.as_str()) && r["state"] != "pending" {
            break v;
        }
        if tokio::time::Instant::now() >= deadline {
            bar.finish_and_clear();
            bail!("{preview}'s data was not refreshed in time");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    bar.finish_and_clear();
    let r = &done["refresh"];
    if r["state"] == "failed" {
        bail!("refreshing {preview}'s data failed: {}", printable(r["reason"].as_str().unwrap_or("no reason given")));
    }
    let how = match r["method"].as_str() {
        Some("import") => "by importing the dump (no image is ready)".to_string(),
        Some(m) => format!("from {} ({m})", done["image"].as_str().unwrap_or("its image")),
        None => String::new(),
    };
    println!("{preview}'s data refreshed {how} in {} ms", r["took_ms"].as_u64().unwrap_or(0));
    Ok(())
}

/// Text with control characters (terminal escapes) shown as `\u{…}`, new lines kept.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() && c != '\n' { c.escape_unicode().to_string() } else { c.to_string() })
        .collect()
}

/// Longest wait for a preview to wake, or for its database to be dumped.
const PULL_WAIT: Duration = Duration::from_secs(3600);

fn spinner(msg: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(indicatif::ProgressStyle::with_template("{msg} {spinner} {elapsed}").expect("valid template"));
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr_with_hz(4));
    bar.set_message(msg.to_string());
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

enum Wake {
    /// The preview does not sleep: waking is not what it needs.
    NotAsleep,
    Failed(anyhow::Error),
}

/// Wakes a sleeping preview and waits until it runs, with a spinner.
async fn wake(api: &Api, preview: &str, deadline: tokio::time::Instant) -> Result<(), Wake> {
    let shown_path = format!("/v1/previews/{}", seg(preview));
    let state = |v: &Value| v["state"].as_str().unwrap_or("unknown").to_string();
    let shown = api.ok(reqwest::Method::GET, &shown_path, None).await.map_err(Wake::Failed)?;
    if !matches!(state(&shown).as_str(), "sleeping" | "stopping" | "waking") {
        return Err(Wake::NotAsleep);
    }
    let bar = spinner(&format!("waking {preview}"));
    let result = async {
        let (s, w) = api.call(reqwest::Method::POST, &format!("{shown_path}/wake"), None).await?;
        if s >= 400 && s != 409 {
            bail!("waking {preview}: {}", w["error"].as_str().unwrap_or("refused"));
        }
        loop {
            let now = state(&api.ok(reqwest::Method::GET, &shown_path, None).await?);
            match now.as_str() {
                "running" => return Ok(()),
                "sleeping" | "stopping" | "waking" | "building" => {}
                other => bail!("{preview} did not wake: it is {other}"),
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("{preview} did not wake in time");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    .await;
    bar.finish_and_clear();
    result.map_err(Wake::Failed)
}

/// `wakegate db pull <preview>`: the preview's database as `.sql.gz` in `output`.
pub async fn pull(api: &Api, preview: &str, output: &str) -> anyhow::Result<()> {
    let path = format!("/v1/previews/{}/db/pull", seg(preview));
    let deadline = tokio::time::Instant::now() + PULL_WAIT;
    // ask; a sleeping preview is woken first
    let mut woken = false;
    loop {
        let (status, v) = api.call(reqwest::Method::POST, &path, None).await?;
        match status {
            200 | 202 => break,
            409 if !woken => {
                wake(api, preview, deadline).await.map_err(|e| match e {
                    Wake::NotAsleep => {
                        anyhow::anyhow!("{}", v["error"].as_str().unwrap_or("the waker refused the pull"))
                    }
                    Wake::Failed(e) => e,
                })?;
                woken = true;
            }
            _ => bail!("{}", v["error"].as_str().unwrap_or(&format!("the waker answered {status}"))),
        }
    }
    // wait for the dump
    let bar = spinner(&format!("dumping {preview}'s database"));
    let ready = loop {
        let v = api.ok(reqwest::Method::GET, &path, None).await?;
        match v["state"].as_str() {
            Some("ready") => break v,
            Some("failed") => {
                bar.finish_and_clear();
                // the reason may come from the preview's machine: shown, never obeyed
                let reason = printable(v["reason"].as_str().unwrap_or("no reason given"));
                bail!("pulling {preview}'s database failed: {reason}");
            }
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            bar.finish_and_clear();
            bail!("{preview}'s database was not dumped in time");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    bar.finish_and_clear();
    let url = ready["url"].as_str().context("the ready pull has no URL")?;
    let size = ready["size"].as_u64();
    // download it, to a temporary file renamed at the end (never half a file under the name)
    let resp = api.http.get(url).send().await.context("downloading the dump")?;
    if !resp.status().is_success() {
        bail!("downloading the dump: S3 answered {}", resp.status());
    }
    let bar = progress_bar(resp.content_length().or(size));
    bar.set_message("downloading");
    let (mut out, tmp): (Box<dyn tokio::io::AsyncWrite + Unpin + Send>, Option<PathBuf>) = if output == "-" {
        (Box::new(tokio::io::stdout()), None)
    } else {
        let tmp = PathBuf::from(format!("{output}.part"));
        let f = tokio::fs::File::create(&tmp).await.with_context(|| format!("creating {}", tmp.display()))?;
        (Box::new(f), Some(tmp))
    };
    let mut stream = resp.bytes_stream();
    let mut got = 0u64;
    let written = async {
        use tokio::io::AsyncWriteExt;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.context("downloading the dump")?;
            out.write_all(&chunk).await.context("writing the dump")?;
            got += chunk.len() as u64;
            bar.inc(chunk.len() as u64);
        }
        out.flush().await.context("writing the dump")?;
        out.shutdown().await.context("writing the dump")?;
        anyhow::Ok(())
    }
    .await;
    bar.finish_and_clear();
    let written = written.and_then(|()| match size {
        Some(s) if s != got => bail!("the download stopped after {got} of {s} bytes"),
        _ => Ok(()),
    });
    if let Err(e) = written {
        if let Some(tmp) = &tmp {
            if let Err(rm) = std::fs::remove_file(tmp) {
                eprintln!("could not remove the partial download {}: {rm}", tmp.display());
            }
        }
        return Err(e);
    }
    if let Some(tmp) = &tmp {
        std::fs::rename(tmp, output).with_context(|| format!("renaming {} to {output}", tmp.display()))?;
    }
    if let Err(e) = api.ok(reqwest::Method::DELETE, &path, None).await {
        eprintln!("warning: removing the pulled dump from S3 failed ({e})");
    }
    if output != "-" {
        println!("{output}: {preview}'s database ({:.1} MB gzipped)", got as f64 / 1e6);
    }
    Ok(())
}
