//! Builds the configured machine backend and the tasks it needs besides the job loop.

use crate::config::{BackendKind, Config, ConfigError};
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use wakegate_provisioner::agent_api::AgentApi;
use wakegate_provisioner::cloud::Cloud;
use wakegate_provisioner::hetzner::{api::ClientOptions, HetznerCloud, HetznerSettings};
use wakegate_provisioner::local::LocalCloud;
use wakegate_store::SharedStore;

pub struct Backend {
    pub cloud: Arc<dyn Cloud>,
    pub hetzner: Option<Arc<HetznerCloud>>,
    /// Where the agent endpoint listens (Hetzner only).
    pub agent_addr: Option<SocketAddr>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Starts the backend `cfg` names. For Hetzner: checks the token by making sure the
/// managed firewall exists, serves the agent endpoint and runs the pool keeper.
pub async fn start(
    cfg: &Config,
    store: SharedStore,
    preview_url_template: &str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Backend> {
    if cfg.backend == BackendKind::Local {
        let root = std::path::absolute(cfg.data_dir.join("machines"))?;
        let cloud = Arc::new(LocalCloud::new(&root)?);
        let every = cfg.sweep_every.min(std::time::Duration::from_secs(1));
        let logs = tokio::spawn(wakegate_provisioner::local::ship_logs(root, store, every, stop));
        return Ok(Backend { cloud, hetzner: None, agent_addr: None, tasks: vec![logs] });
    }
    let h = &cfg.hetzner;
    let token = h.token.clone().ok_or(ConfigError::Missing("WAKEGATE_HETZNER_TOKEN"))?;
    let machine_key = Config::require_key(&h.machine_key, "WAKEGATE_MACHINE_KEY")?;
    let listener = TcpListener::bind(h.agent_addr)
        .await
        .with_context(|| format!("cannot listen on {} for agents (set WAKEGATE_AGENT_ADDR)", h.agent_addr))?;
    let agent_addr = listener.local_addr()?;
    let mut api = ClientOptions::new(h.api_url.clone(), token);
    api.action_poll = h.action_poll;
    api.backoff_base = h.backoff;
    let settings = HetznerSettings {
        api,
        image: h.image.clone(),
        server_type: h.server_type.clone(),
        location: h.location.clone(),
        control_url: h.control_url.clone().unwrap_or_else(|| format!("http://{agent_addr}")),
        control_plane_ips: h.control_plane_ips.clone(),
        edge_ranges: h.edge_ranges.clone(),
        app_port: h.app_port,
        pools: h.pools.clone(),
        ready_timeout: h.ready_timeout,
        shutdown_timeout: std::time::Duration::from_secs(60),
    };
    let hetzner = Arc::new(HetznerCloud::new(settings, store.clone(), machine_key.clone())?);
    hetzner.ensure_firewall().await.context("setting up the preview firewall through the Hetzner API")?;
    let cloud: Arc<dyn Cloud> = hetzner.clone();
    let agent = Arc::new(AgentApi {
        store,
        cloud: cloud.clone(),
        key: machine_key,
        retry_after: format!("{}", h.agent_retry.as_secs_f64()),
        preview_url_template: preview_url_template.to_string(),
        dumps: cfg.s3.clone().map(wakegate_db::s3::Bucket::new),
        db_images: cfg.db_images,
    });
    tracing::info!(addr = %agent_addr, api = %h.api_url, "Hetzner backend: agent endpoint listening");
    let tasks = vec![
        tokio::spawn(wakegate_provisioner::agent_api::serve(listener, agent)),
        tokio::spawn(hetzner.clone().run_pools(cfg.sweep_every, stop)),
    ];
    Ok(Backend { cloud, hetzner: Some(hetzner), agent_addr: Some(agent_addr), tasks })
}
