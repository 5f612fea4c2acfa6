//! Everything in one process: what `wakegate dev` runs and the end-to-end tests drive.

use crate::config::{random_secret, Config};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use wakegate_core::lifecycle::{Event, State};
use wakegate_core::sign::Key;
use wakegate_edge::native::EdgeServer;
use wakegate_provisioner::now_ms;
use wakegate_provisioner::runner::Provisioner;
use wakegate_store::driver::apply;
use wakegate_store::SharedStore;
use wakegate_waker::{refs::GitRefs, Waker, WakerConfig};

/// A running edge + waker + provisioner.
pub struct Dev {
    pub edge_addr: SocketAddr,
    pub waker_addr: SocketAddr,
    pub store: SharedStore,
    pub provisioner: Arc<Provisioner>,
    pub machines_dir: PathBuf,
    pub operator_token: String,
    /// `http://{label}.localhost:<edge port>`
    pub preview_url_template: String,
    /// The Hetzner backend when configured (tests reach its pool keeper through it).
    pub hetzner: Option<Arc<wakegate_provisioner::hetzner::HetznerCloud>>,
    pub agent_addr: Option<SocketAddr>,
    /// Where `/metrics` answers, when `WAKEGATE_METRICS_ADDR` is set.
    pub metrics_addr: Option<SocketAddr>,
    metrics_stop: tokio_util::sync::CancellationToken,
    stop: tokio::sync::watch::Sender<bool>,
    edge: Option<EdgeServer>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn key_or_random(k: &Option<Key>) -> Key {
    k.clone().unwrap_or_else(|| Key::new(random_secret().into_bytes()))
}

impl Dev {
    /// Binds the edge and waker (ports from `cfg`, 0 for any), starts everything on
    /// `store` with the local backend under `<data>/machines`.
    pub async fn start(cfg: &Config, store: SharedStore) -> anyhow::Result<Dev> {
        use anyhow::Context as _;
        // the recorder first: the edge's threads take their metric handles as they start
        if cfg.metrics_addr.is_some() {
            crate::metrics::handle()?;
        }
        let waker_listener = TcpListener::bind(cfg.waker_addr)
            .await
            .with_context(|| format!("cannot listen on {} for waker (set WAKEGATE_WAKER_ADDR)", cfg.waker_addr))?;
        let waker_addr = waker_listener.local_addr()?;
        let edge_key = key_or_random(&cfg.edge_key);
        // one serving thread is plenty on a developer's machine
        let edge = EdgeServer::start(
            cfg.edge_addr,
            cfg.edge_config(
                format!("http://{waker_addr}"),
                edge_key.clone(),
                key_or_random(&cfg.csrf_key),
                key_or_random(&cfg.origin_key),
            ),
            1,
        )
        .with_context(|| format!("cannot listen on {} for the edge (set WAKEGATE_EDGE_ADDR)", cfg.edge_addr))?;
        let edge_addr = edge.addr;
        let operator_token = cfg.operator_token.clone().unwrap_or_else(random_secret);
        let preview_url_template = cfg.preview_url(edge_addr.port());

        let waker = Arc::new(
            Waker::new(
                store.clone(),
                WakerConfig {
                    edge_key: edge_key.clone(),
                    operator_token: operator_token.clone(),
                    preview_base: cfg.preview_base.clone(),
                    preview_url_template: preview_url_template.clone(),
                },
                Arc::new(GitRefs::new(Duration::from_secs(2))),
            )
            .with_orgs(cfg.org_settings())
            .with_saas(cfg.saas.clone())
            .with_forge(cfg.forge.clone())
            .with_dumps(cfg.s3.clone().map(wakegate_db::s3::Bucket::new)),
        );
        let machines_dir = std::path::absolute(cfg.data_dir.join("machines"))?;
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let backend = crate::backend::start(cfg, store.clone(), &preview_url_template, stop_rx.clone()).await?;
        let mut provisioner = Provisioner::new(
            store.clone(),
            backend.cloud.clone(),
            cfg.provisioner_settings(preview_url_template.clone()),
        );
        provisioner.dumps = cfg.s3.clone().map(wakegate_db::s3::Bucket::new);
        let provisioner = Arc::new(provisioner);
        let mut tasks = backend.tasks;
        tasks.push(tokio::spawn(wakegate_waker::orgs::recheck_loop(waker.clone())));
        let forge = waker.spawn_forge();
        tasks.push(tokio::spawn(async move {
            // the loops end when this task is aborted (their handles abort on drop)
            let _forge = forge;
            std::future::pending::<()>().await
        }));
        if let Some(saas) = cfg.saas.clone() {
            tasks.push(tokio::spawn(wakegate_waker::saas::sync_loop(
                waker.clone(),
                wakegate_waker::saas::Client::new(saas),
            )));
        }
        tasks.push(tokio::spawn(wakegate_waker::serve(waker_listener, waker)));
        tasks.extend(provisioner.spawn_all(stop_rx));
        let metrics_stop = tokio_util::sync::CancellationToken::new();
        let metrics_addr = match cfg.metrics_addr {
            Some(addr) => Some(crate::metrics::serve(addr, metrics_stop.clone()).await?),
            None => None,
        };
        Ok(Dev {
            metrics_addr,
            metrics_stop,
            edge_addr,
            waker_addr,
            store,
            provisioner,
            machines_dir,
            operator_token,
            preview_url_template,
            hetzner: backend.hetzner,
            agent_addr: backend.agent_addr,
            stop,
            edge: Some(edge),
            tasks,
        })
    }

    /// Stops cleanly: running previews are put to sleep (a later start wakes them on
    /// the first visit), then the tasks end.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Ok(previews) = self.store.list_previews().await {
            for p in previews {
                if let State::Running { machine, .. } = &p.value.state {
                    let Ok(Some(project)) = self.store.get_project(&p.value.project_id).await else { continue };
                    if apply(self.store.as_ref(), &p.value.id, &Event::SleepRequested, now_ms()).await.is_ok()
                        && self.provisioner.cloud.stop(machine, &project).await.is_ok()
                    {
                        metrics::counter!(wakegate_core::metrics::SLEEPS, "reason" => "shutdown").increment(1);
                        if let Err(e) = apply(self.store.as_ref(), &p.value.id, &Event::Stopped, now_ms()).await {
                            tracing::warn!(preview = %p.value.id, error = %e, "recording a stop at shutdown failed");
                        }
                    }
                }
            }
        }
        self.edge.take();
        self.metrics_stop.cancel();
        for t in self.tasks.drain(..) {
            t.abort();
        }
        wakegate_provisioner::local::kill_all_blocking(&self.machines_dir);
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        self.metrics_stop.cancel();
        for t in &self.tasks {
            t.abort();
        }
        if !self.tasks.is_empty() {
            wakegate_provisioner::local::kill_all_blocking(&self.machines_dir);
        }
    }
}
