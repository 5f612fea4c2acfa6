//! `wakegate waker | edge | provisioner`: one part per process, sharing Redis.

use crate::config::{Config, ConfigError};
use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use wakegate_edge::native::EdgeServer;
use wakegate_provisioner::runner::Provisioner;
use wakegate_store::{RedisStore, SharedStore};
use wakegate_waker::{refs::GitRefs, Waker, WakerConfig};

/// Resolves on SIGTERM (what systemd and container runtimes send) or Ctrl-C.
pub async fn terminated() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping (a second signal stops at once)"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: stopping (a second signal stops at once)"),
    }
    // a second signal during the grace period: the operator means it
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::warn!("second signal: stopping at once");
        std::process::exit(130);
    });
}

async fn redis(cfg: &Config) -> anyhow::Result<SharedStore> {
    let url = cfg.redis_url.as_deref().ok_or(ConfigError::Missing("WAKEGATE_REDIS_URL"))?;
    Ok(Arc::new(RedisStore::connect(url, &cfg.redis_prefix).await.with_context(|| format!("connecting to {url}"))?))
}

pub async fn waker(cfg: Config) -> anyhow::Result<()> {
    let store = redis(&cfg).await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let token = cfg.operator_token.clone().ok_or(ConfigError::Missing("WAKEGATE_OPERATOR_TOKEN"))?;
    let waker = Arc::new(
        Waker::new(
            store,
            WakerConfig {
                edge_key: Config::require_key(&cfg.edge_key, "WAKEGATE_EDGE_KEY")?,
                operator_token: token,
                preview_base: cfg.preview_base.clone(),
                preview_url_template: cfg.preview_url(cfg.edge_addr.port()),
            },
            Arc::new(GitRefs::new(Duration::from_secs(5))),
        )
        .with_orgs(cfg.org_settings())
        .with_saas(cfg.saas.clone())
        .with_forge(cfg.forge.clone())
        .with_dumps(cfg.s3.clone().map(wakegate_db::s3::Bucket::new))
        .with_stopping(shutdown.clone()),
    );
    let listener = TcpListener::bind(cfg.waker_addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "waker listening");
    crate::metrics::maybe_serve(cfg.metrics_addr, &shutdown).await?;
    let _forge = waker.spawn_forge();
    let _recheck =
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(wakegate_waker::orgs::recheck_loop(waker.clone())));
    let _saas = cfg.saas.clone().map(|saas| {
        let client = wakegate_waker::saas::Client::new(saas);
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(wakegate_waker::saas::sync_loop(waker.clone(), client)))
    });
    let stop = shutdown.clone();
    let signal = tokio::spawn(async move {
        terminated().await;
        stop.cancel();
    });
    wakegate_waker::serve_until(listener, waker, shutdown, cfg.shutdown_grace).await;
    signal.abort();
    tracing::info!("waker stopped");
    Ok(())
}

pub async fn edge(cfg: Config) -> anyhow::Result<()> {
    let edge = cfg.edge_config(
        cfg.waker_url.clone(),
        Config::require_key(&cfg.edge_key, "WAKEGATE_EDGE_KEY")?,
        Config::require_key(&cfg.csrf_key, "WAKEGATE_CSRF_KEY")?,
        Config::require_key(&cfg.origin_key, "WAKEGATE_ORIGIN_KEY")?,
    );
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    // the recorder before the threads: they take their metric handles as they start
    let metrics_stop = tokio_util::sync::CancellationToken::new();
    crate::metrics::maybe_serve(cfg.metrics_addr, &metrics_stop).await?;
    let server = EdgeServer::start(cfg.edge_addr, edge, threads)
        .with_context(|| format!("binding the edge to {} (WAKEGATE_EDGE_ADDR)", cfg.edge_addr))?;
    let addr = server.addr;
    tracing::info!(%addr, threads, waker = %cfg.waker_url, "edge listening");
    terminated().await;
    metrics_stop.cancel();
    server.shutdown(cfg.shutdown_grace).await;
    tracing::info!("edge stopped");
    Ok(())
}

pub async fn provisioner(cfg: Config) -> anyhow::Result<()> {
    let store = redis(&cfg).await?;
    let template = cfg.preview_url(cfg.edge_addr.port());
    let (stop, rx) = tokio::sync::watch::channel(false);
    // the recorder before anything records
    let metrics_stop = tokio_util::sync::CancellationToken::new();
    crate::metrics::maybe_serve(cfg.metrics_addr, &metrics_stop).await?;
    let backend = crate::backend::start(&cfg, store.clone(), &template, rx.clone()).await?;
    let mut p = Provisioner::new(store, backend.cloud.clone(), cfg.provisioner_settings(template));
    p.dumps = cfg.s3.clone().map(wakegate_db::s3::Bucket::new);
    let p = Arc::new(p);
    tracing::info!(worker = %p.worker, "provisioner running");
    let tasks = p.spawn_all(rx);
    // stop claiming on a signal; jobs in flight get the grace period to finish (one cut
    // short keeps its lease until it runs out, and another worker takes it up)
    terminated().await;
    let _ = stop.send(true);
    let deadline = tokio::time::Instant::now() + cfg.shutdown_grace + Duration::from_secs(5);
    for mut t in tasks {
        match tokio::time::timeout_at(deadline, &mut t).await {
            Ok(Err(e)) => tracing::error!(error = %e, "a provisioner task ended abnormally"),
            Ok(Ok(())) => {}
            Err(_) => {
                tracing::warn!("a provisioner task did not stop within the grace period; stopping it");
                t.abort();
            }
        }
    }
    for t in backend.tasks {
        t.abort();
    }
    metrics_stop.cancel();
    tracing::info!("provisioner stopped");
    Ok(())
}
