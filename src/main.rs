//! `wakegate`: the command line. See README.md.

use anyhow::Context;
use std::sync::Arc;
use wakegate::cli::{PreviewCmd, ProjectCmd, Streams, Target};
use wakegate::config::{Config, Env};
use wakegate::dbcli::seg;
use wakegate::dev::Dev;

/// glibc's malloc showed as ~10% of the proxy hot path under load; mimalloc's
/// thread-local free lists remove most of it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Preview URLs that always work: the edge router and wake-on-request provisioner.
///
/// Settings come from WAKEGATE_* environment variables; see README.md.
#[derive(clap::Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Edge + waker + provisioner in one process, embedded store, local backend, with a
    /// demo project (no Redis or cloud needed).
    Dev,
    /// The control API (needs WAKEGATE_REDIS_URL).
    Waker,
    /// The native edge (needs WAKEGATE_WAKER_URL and the keys).
    Edge,
    /// The job runner and sweepers (needs WAKEGATE_REDIS_URL).
    Provisioner,
    /// Prints the waker's OpenAPI document.
    Openapi,
    /// Previews: list, show, create, pin, unpin, ttl, sleep, wake, erase, rebuild.
    Previews {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        cmd: PreviewCmd,
    },
    /// Projects: list, show, create.
    Projects {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        cmd: ProjectCmd,
    },
    /// A preview's build and app logs.
    Logs {
        #[command(flatten)]
        target: Target,
        /// An id (`pv-…`) or `project/ref`.
        preview: String,
        /// Which log.
        #[arg(long, value_enum, default_value = "all")]
        stream: Streams,
        /// Keeps printing what comes (Ctrl-C stops).
        #[arg(short, long)]
        follow: bool,
    },
    /// Orgs, the domains they prove and their preview bases.
    Org {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        cmd: OrgCmd,
    },
    /// A project's database dumps in S3.
    Db {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        cmd: DbCmd,
    },
    /// Prints shell completions (bash, zsh, fish, elvish, powershell), e.g.
    /// `wakegate completions bash > /etc/bash_completion.d/wakegate`.
    Completions { shell: clap_complete::Shell },
}

#[derive(clap::Subcommand)]
enum DbCmd {
    /// Uploads a .sql or .sql.gz (or `-` for stdin) and makes it the project's base once
    /// it is checked; an interrupted push of a file resumes when run again.
    Push {
        project: String,
        file: String,
        /// postgres or mariadb (needed for the project's first dump).
        #[arg(long)]
        engine: Option<String>,
        /// Import into this preview only (rebuilds it); the base stays.
        #[arg(long)]
        target: Option<String>,
    },
    /// The project's dumps, newest first, and which is the base.
    List { project: String },
    /// Makes an earlier dump the base again.
    Use { project: String, dump: String },
    /// Deletes a dump (never the base).
    Rm { project: String, dump: String },
    /// The database images (of one project): engine, dump, size, age, previews using each.
    Images { project: Option<String> },
    /// One preview's database: the image it was cloned from, how, how far it has diverged.
    Show {
        /// An id (`pv-…`) or `project/ref`.
        preview: String,
    },
    /// Makes a running preview's data again from the current image (from the dump when
    /// no image is ready), without rebuilding the app; waits and says how long it took.
    Refresh {
        /// An id (`pv-…`) or `project/ref`.
        preview: String,
        /// Return once asked, without waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// Downloads a preview's database as .sql.gz (waking the preview if it sleeps).
    Pull {
        preview: String,
        /// Where to write it (`-`: standard output); `<preview>.sql.gz` by default.
        #[arg(short, long)]
        output: Option<String>,
    },
}

#[derive(clap::Subcommand)]
enum OrgCmd {
    /// Every org.
    List,
    /// One org: its domains (with the TXT record each needs) and bases.
    Show { org: String },
    /// Creates an org.
    Create { name: String },
    /// Adds a domain to prove; prints the TXT record to create.
    AddDomain { org: String, domain: String },
    /// Looks the domain's TXT record up now; says what it found when it fails.
    Verify { org: String, domain: String },
    /// Removes a domain (refused while a base is under it).
    RemoveDomain { org: String, domain: String },
    /// Adds a preview base; prints the DNS record to create.
    AddBase { org: String, base: String },
    /// Removes a base; its names stop answering.
    RemoveBase { org: String, base: String },
}

/// Logging as `RUST_LOG` directs (`info` when unset; e.g. `warn,wakegate_provisioner=debug`),
/// as text or, with `WAKEGATE_LOG_FORMAT=json`, one JSON object per line carrying the
/// spans (the preview and project a job works on).
fn init_tracing() -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(s) if !s.trim().is_empty() => {
            EnvFilter::try_new(&s).with_context(|| format!("RUST_LOG={s:?} is not a list of filter directives"))?
        }
        _ => EnvFilter::new("info"),
    };
    let format = std::env::var("WAKEGATE_LOG_FORMAT").unwrap_or_default();
    let subscriber = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format.as_str() {
        "" | "text" => subscriber.init(),
        "json" => subscriber.json().with_current_span(true).with_span_list(true).init(),
        other => anyhow::bail!("WAKEGATE_LOG_FORMAT must be text or json, not {other:?}"),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = <Cli as clap::Parser>::parse();
    match cli.cmd {
        Cmd::Openapi => {
            println!("{}", wakegate_waker::openapi_json());
            return Ok(());
        }
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "wakegate", &mut std::io::stdout());
            return Ok(());
        }
        _ => {}
    }
    init_tracing()?;
    let cfg = Config::from_source(&Env)?;
    match cli.cmd {
        Cmd::Dev => dev(cfg).await,
        Cmd::Waker => wakegate::parts::waker(cfg).await,
        Cmd::Edge => wakegate::parts::edge(cfg).await,
        Cmd::Provisioner => wakegate::parts::provisioner(cfg).await,
        Cmd::Openapi | Cmd::Completions { .. } => Ok(()),
        Cmd::Previews { target, cmd } => wakegate::cli::previews(&target.api(&cfg)?, cmd).await,
        Cmd::Projects { target, cmd } => wakegate::cli::projects(&target.api(&cfg)?, cmd).await,
        Cmd::Logs { target, preview, stream, follow } => {
            wakegate::cli::logs(&target.api(&cfg)?, &preview, stream, follow).await
        }
        Cmd::Org { target, cmd } => org(&target.api(&cfg)?, cmd).await,
        Cmd::Db { target, cmd } => db(&target.api(&cfg)?, cmd).await,
    }
}

async fn db(api: &wakegate::dbcli::Api, cmd: DbCmd) -> anyhow::Result<()> {
    match cmd {
        DbCmd::Push { project, file, engine, target } => {
            let p = wakegate::dbcli::Push {
                project: &project,
                file: &file,
                engine: engine.as_deref(),
                target: target.as_deref(),
            };
            wakegate::dbcli::push(api, p).await
        }
        DbCmd::List { project } => wakegate::dbcli::list(api, &project).await,
        DbCmd::Images { project } => wakegate::dbcli::images(api, project.as_deref()).await,
        DbCmd::Show { preview } => {
            let id = wakegate::cli::resolve(api, &preview).await?;
            wakegate::dbcli::show(api, &id).await
        }
        DbCmd::Refresh { preview, no_wait } => {
            let id = wakegate::cli::resolve(api, &preview).await?;
            wakegate::dbcli::refresh(api, &id, !no_wait).await
        }
        DbCmd::Pull { preview, output } => {
            let output = output.unwrap_or_else(|| format!("{preview}.sql.gz"));
            wakegate::dbcli::pull(api, &preview, &output).await
        }
        DbCmd::Use { project, dump } => {
            api.ok(reqwest::Method::POST, &format!("/v1/projects/{}/dumps/{}/use", seg(&project), seg(&dump)), None)
                .await?;
            println!("{dump} is now the base of {project}");
            Ok(())
        }
        DbCmd::Rm { project, dump } => {
            api.ok(reqwest::Method::DELETE, &format!("/v1/projects/{}/dumps/{}", seg(&project), seg(&dump)), None)
                .await?;
            println!("{dump} removed");
            Ok(())
        }
    }
}

async fn org(api: &wakegate::dbcli::Api, cmd: OrgCmd) -> anyhow::Result<()> {
    use reqwest::Method;
    let (method, path, body) = match cmd {
        OrgCmd::List => (Method::GET, "/v1/orgs".to_string(), None),
        OrgCmd::Show { org } => (Method::GET, format!("/v1/orgs/{}", seg(&org)), None),
        OrgCmd::Create { name } => (Method::POST, "/v1/orgs".into(), Some(serde_json::json!({ "name": name }))),
        OrgCmd::AddDomain { org, domain } => {
            (Method::POST, format!("/v1/orgs/{}/domains", seg(&org)), Some(serde_json::json!({ "domain": domain })))
        }
        OrgCmd::Verify { org, domain } => {
            (Method::POST, format!("/v1/orgs/{}/domains/{}/verify", seg(&org), seg(&domain)), None)
        }
        OrgCmd::RemoveDomain { org, domain } => {
            (Method::DELETE, format!("/v1/orgs/{}/domains/{}", seg(&org), seg(&domain)), None)
        }
        OrgCmd::AddBase { org, base } => {
            (Method::POST, format!("/v1/orgs/{}/bases", seg(&org)), Some(serde_json::json!({ "base": base })))
        }
        OrgCmd::RemoveBase { org, base } => {
            (Method::DELETE, format!("/v1/orgs/{}/bases/{}", seg(&org), seg(&base)), None)
        }
    };
    let (status, answer) = api.call(method, &path, body).await?;
    if status >= 400 {
        let field = answer["field"].as_str().map(|f| format!(" ({f})")).unwrap_or_default();
        anyhow::bail!("{status}: {}{field}", answer["error"].as_str().unwrap_or("failed"));
    }
    if !answer.is_null() {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    }
    Ok(())
}

async fn dev(cfg: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let store = Arc::new(wakegate_store::EmbeddedStore::open(&cfg.data_dir.join("store.log"))?);
    let dev = Dev::start(&cfg, store).await?;
    let repo = wakegate::demo::ensure_repo(&cfg.data_dir)?;
    let token = dev.operator_token.clone();
    let call = |method: &'static str, path: String, body: serde_json::Value| {
        let token = token.clone();
        let addr = dev.waker_addr;
        async move { wakegate::operator::call(addr, &token, method, &path, Some(body)).await }
    };
    // the demo project is created once; a restart finds it
    let (status, body) = call("GET", "/v1/projects/demo".into(), serde_json::Value::Null).await?;
    if status == 404 {
        let (status, body) = call(
            "POST",
            "/v1/projects".into(),
            serde_json::json!({"name": "demo", "git_url": repo, "ttl_hours": 24, "idle_timeout_secs": 600}),
        )
        .await?;
        anyhow::ensure!(status == 201, "creating the demo project: {status} {body}");
    } else {
        anyhow::ensure!(status == 200, "reading the demo project: {status} {body}");
    }
    println!("\nWakegate is running (embedded store, local backend, data in {}).\n", cfg.data_dir.display());
    for branch in wakegate::demo::BRANCHES {
        let (status, p) = call("POST", "/v1/projects/demo/previews".into(), serde_json::json!({"ref": branch})).await?;
        anyhow::ensure!(status == 200 || status == 201, "creating the {branch} preview: {status} {p}");
        println!("  {:<14} {}   ({})", branch, p["url"].as_str().unwrap_or(""), p["state"].as_str().unwrap_or(""));
    }
    println!("\nOperator API: http://{}/v1/previews  (Authorization: Bearer {})", dev.waker_addr, dev.operator_token);
    println!("Dashboard:    http://{}/dashboard  (log in with that token)", dev.waker_addr);
    println!(
        "CLI:          WAKEGATE_WAKER_URL=http://{} WAKEGATE_OPERATOR_TOKEN={} wakegate previews ls",
        dev.waker_addr, dev.operator_token
    );
    println!("Stop with Ctrl-C (or SIGTERM): running previews are put to sleep and wake on the next visit.\n");
    wakegate::parts::terminated().await;
    println!("stopping…");
    dev.shutdown().await;
    Ok(())
}
