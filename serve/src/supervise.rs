//! Supervised background tasks: a task that panics is logged and started again (after
//! a pause that grows while it keeps failing), so no data and no bug can stop TTL
//! expiry, idle sleep or repairs for good. A task that returns has finished on purpose
//! (shutdown) and is not restarted.

use std::future::Future;
use std::time::Duration;
use tracing::error;

/// Runs `make()` until it returns; restarts it whenever it panics.
pub async fn supervise<F, Fut>(name: &'static str, make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut pause = Duration::from_millis(100);
    loop {
        // aborting the supervisor ends the task too
        match tokio_util::task::AbortOnDropHandle::new(tokio::spawn(make())).await {
            Ok(()) => return,
            Err(e) if e.is_panic() => {
                let message = panic_message(e.into_panic().as_ref());
                error!(task = name, panic = %message, restart_in_ms = pause.as_millis() as u64, "task panicked; restarting");
            }
            // cancelled: the runtime is going away
            Err(_) => return,
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

/// The text a panic was raised with.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_restarted_until_it_returns() {
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        supervise("test", move || {
            let r = r.clone();
            async move {
                if r.fetch_add(1, Ordering::SeqCst) < 3 {
                    panic!("boom");
                }
            }
        })
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 4);
    }
}
