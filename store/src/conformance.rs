//! The behaviour every [`Store`] must have. `store/tests/` runs it against the embedded
//! store and against a real `redis-server`.

use crate::{Lane, Store, StoreError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use wakegate_core::lifecycle::{JobKind, Phase, State};
use wakegate_core::route::{Preview, Project};
use wakegate_core::Millis;

fn now() -> Millis {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as Millis
}

pub fn project(name: &str) -> Project {
    Project {
        id: format!("p_{name}"),
        name: name.to_string(),
        git_url: format!("file:///repos/{name}.git"),
        ttl_hours: 1.5,
        idle_timeout_secs: 600,
        created_at: 1,
        machine: Default::default(),
        org_id: wakegate_core::route::DEFAULT_ORG_ID.into(),
        forge: None,
    }
}

pub fn preview(id: &str) -> Preview {
    Preview {
        id: id.to_string(),
        project_id: "p_web".into(),
        project: "web".into(),
        git_ref: "refs/heads/main".into(),
        label: format!("web-main-{id}"),
        state: State::queued(),
        state_since: 1,
        created_at: 1,
        built_at: 1,
        ttl_hours: None,
        pinned: false,
        last_error: None,
        custom_hosts: Vec::new(),
        change: None,
        commit: None,
        dump: None,
        progress: None,
    }
}

/// Runs every check; `fresh` makes an empty store.
pub async fn run_all<F, Fut>(fresh: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Arc<dyn Store>>,
{
    projects(fresh().await).await;
    compare_and_set(fresh().await).await;
    hosts(fresh().await).await;
    ttl_and_activity(fresh().await).await;
    jobs_are_idempotent(fresh().await).await;
    leases_expire_and_are_retried(fresh().await).await;
    concurrent_enqueue_makes_one_job(fresh().await).await;
    enqueue_wakes_job_waiters(fresh().await).await;
    status_waits(fresh().await).await;
    tables_take_once(fresh().await).await;
    tables_compare_and_set(fresh().await).await;
    activity_is_forgotten_only_if_unchanged(fresh().await).await;
    rate_limits_are_gcra(fresh().await).await;
    nonces_are_claimed_once(fresh().await).await;
}

pub async fn activity_is_forgotten_only_if_unchanged(s: Arc<dyn Store>) {
    s.touch(&["a".into(), "b".into()], 10).await.unwrap();
    s.forget_activity("a", 10).await.unwrap();
    assert_eq!(s.last_activity("a").await.unwrap(), None);
    s.touch(&["b".into()], 20).await.unwrap();
    // the sweeper read 10, then b was touched again: it stays
    s.forget_activity("b", 10).await.unwrap();
    assert_eq!(s.last_activity("b").await.unwrap(), Some(20));
    assert_eq!(s.idle_before(100, 10).await.unwrap(), vec![("b".to_string(), 20)]);
    s.forget_activity("nobody", 1).await.unwrap();
    // real timestamps survive the trip through a sorted-set score
    let at = 1_764_000_000_123;
    s.touch(&["c".into()], at).await.unwrap();
    s.forget_activity("c", at).await.unwrap();
    assert_eq!(s.last_activity("c").await.unwrap(), None);
}

pub async fn rate_limits_are_gcra(s: Arc<dyn Store>) {
    let hour = std::time::Duration::from_secs(3600);
    let t = now();
    for i in 0..3 {
        assert!(s.rate_limit("ip:1", 3, hour, t).await.unwrap(), "use {i} is within the burst");
    }
    assert!(!s.rate_limit("ip:1", 3, hour, t).await.unwrap(), "the fourth is refused");
    assert!(s.rate_limit("ip:2", 3, hour, t).await.unwrap(), "keys are independent");
    // one use comes back every window / limit
    assert!(!s.rate_limit("ip:1", 3, hour, t + 1_199_000).await.unwrap());
    assert!(s.rate_limit("ip:1", 3, hour, t + 1_200_000).await.unwrap());
    assert!(!s.rate_limit("ip:1", 3, hour, t + 1_200_000).await.unwrap());
    // absurd values neither panic nor wrap
    assert!(s.rate_limit("x", 0, hour, t).await.unwrap());
    assert!(s.rate_limit("y", u32::MAX, std::time::Duration::from_millis(1), t).await.unwrap());
}

pub async fn nonces_are_claimed_once(s: Arc<dyn Store>) {
    let t = now();
    assert!(s.claim_nonce("n1", t + 60_000, t).await.unwrap());
    assert!(!s.claim_nonce("n1", t + 60_000, t).await.unwrap(), "a replay is refused");
    assert!(s.claim_nonce("n2", t + 60_000, t).await.unwrap());
}

pub async fn projects(s: Arc<dyn Store>) {
    s.create_project(&project("web")).await.unwrap();
    assert!(matches!(s.create_project(&project("web")).await, Err(StoreError::Exists(_))));
    let mut other = project("web");
    other.id = "p_other".into();
    assert!(matches!(s.create_project(&other).await, Err(StoreError::Exists(_))), "names are unique");
    assert_eq!(s.get_project("p_web").await.unwrap().unwrap().name, "web");
    assert_eq!(s.project_by_name("web").await.unwrap().unwrap().id, "p_web");
    assert!(s.project_by_name("nope").await.unwrap().is_none());
    assert_eq!(s.list_projects().await.unwrap().len(), 1);
}

pub async fn compare_and_set(s: Arc<dyn Store>) {
    let mut p = preview("a");
    assert_eq!(s.put_preview(&p, None).await.unwrap(), 1);
    assert!(matches!(s.put_preview(&p, None).await, Err(StoreError::Conflict)), "create twice");
    p.state = State::Building { phase: Phase::Build, machine: Some("m1".into()), serving: None, restart: false };
    assert_eq!(s.put_preview(&p, Some(1)).await.unwrap(), 2);
    assert!(matches!(s.put_preview(&p, Some(1)).await, Err(StoreError::Conflict)), "stale version");
    let got = s.get_preview("a").await.unwrap().unwrap();
    assert_eq!(got.version, 2);
    assert_eq!(got.value, p);
    assert!(s.get_preview("b").await.unwrap().is_none());
    s.put_preview(&preview("b"), None).await.unwrap();
    let all = s.list_previews().await.unwrap();
    assert_eq!(all.iter().map(|v| v.value.id.as_str()).collect::<Vec<_>>(), vec!["a", "b"]);

    // racing writers from the same version: exactly one wins
    let base = s.get_preview("b").await.unwrap().unwrap();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let s = s.clone();
        let mut v = base.value.clone();
        v.last_error = Some(format!("w{i}"));
        tasks.push(tokio::spawn(async move { s.put_preview(&v, Some(base.version)).await.is_ok() }));
    }
    let mut wins = 0;
    for t in tasks {
        wins += t.await.unwrap() as u32;
    }
    assert_eq!(wins, 1);
}

pub async fn hosts(s: Arc<dyn Store>) {
    s.bind_host("web-main-x.localhost", "a").await.unwrap();
    s.bind_host("web-main-x.localhost", "a").await.unwrap();
    assert!(matches!(s.bind_host("web-main-x.localhost", "b").await, Err(StoreError::Exists(_))));
    assert_eq!(s.resolve_host("web-main-x.localhost").await.unwrap().as_deref(), Some("a"));
    assert!(s.resolve_host("other.localhost").await.unwrap().is_none());
    // unbinding takes only the preview's own host
    assert!(!s.unbind_host("web-main-x.localhost", "b").await.unwrap());
    assert!(s.unbind_host("web-main-x.localhost", "a").await.unwrap());
    assert!(!s.unbind_host("web-main-x.localhost", "a").await.unwrap());
    assert!(s.resolve_host("web-main-x.localhost").await.unwrap().is_none());
    s.bind_host("web-main-x.localhost", "b").await.unwrap();
    assert_eq!(s.resolve_host("web-main-x.localhost").await.unwrap().as_deref(), Some("b"));
}

pub async fn ttl_and_activity(s: Arc<dyn Store>) {
    s.set_expiry("a", Some(100)).await.unwrap();
    s.set_expiry("b", Some(50)).await.unwrap();
    s.set_expiry("c", Some(500)).await.unwrap();
    assert_eq!(s.due_expiries(100, 10).await.unwrap(), vec!["b", "a"]);
    assert_eq!(s.due_expiries(100, 1).await.unwrap(), vec!["b"]);
    s.set_expiry("b", None).await.unwrap();
    s.set_expiry("a", Some(1000)).await.unwrap();
    assert!(s.due_expiries(100, 10).await.unwrap().is_empty());

    s.touch(&["a".into(), "b".into()], 10).await.unwrap();
    s.touch(&["a".into()], 30).await.unwrap();
    s.touch(&["a".into()], 20).await.unwrap(); // older: ignored
    assert_eq!(s.last_activity("a").await.unwrap(), Some(30));
    assert_eq!(s.last_activity("zzz").await.unwrap(), None);
    assert_eq!(s.idle_before(25, 10).await.unwrap(), vec![("b".to_string(), 10)]);
    assert_eq!(s.idle_before(31, 10).await.unwrap().len(), 2);
    s.touch(&[], 40).await.unwrap();
}

pub async fn jobs_are_idempotent(s: Arc<dyn Store>) {
    let a = s.enqueue("p1", JobKind::Wake).await.unwrap();
    assert!(a.created);
    let b = s.enqueue("p1", JobKind::Wake).await.unwrap();
    assert!(!b.created);
    assert_eq!(a.job_id, b.job_id);
    assert!(s.enqueue("p1", JobKind::Build).await.unwrap().created, "another kind is another job");
    assert!(s.enqueue("p2", JobKind::Wake).await.unwrap().created);
    assert_eq!(s.jobs().await.unwrap().len(), 3);

    let lease = s.claim("w1", Lane::Quick, Duration::from_secs(30), now()).await.unwrap().unwrap();
    assert_eq!((lease.preview_id.as_str(), lease.kind), ("p1", JobKind::Wake));
    // still one job while it runs
    assert!(!s.enqueue("p1", JobKind::Wake).await.unwrap().created);
    s.renew(&lease, Duration::from_secs(30), now()).await.unwrap();
    s.complete(&lease).await.unwrap();
    s.complete(&lease).await.unwrap(); // twice is fine
    assert!(s.enqueue("p1", JobKind::Wake).await.unwrap().created, "slot freed after completion");

    let mut claimed = Vec::new();
    for lane in Lane::ALL {
        while let Some(l) = s.claim("w1", lane, Duration::from_secs(30), now()).await.unwrap() {
            assert_eq!(Lane::of(l.kind), lane, "a lane hands out only its own jobs");
            claimed.push((l.preview_id.clone(), l.kind));
            s.complete(&l).await.unwrap();
            assert!(claimed.len() < 10);
        }
    }
    assert_eq!(claimed.len(), 3);
    assert!(s.jobs().await.unwrap().is_empty());
}

pub async fn leases_expire_and_are_retried(s: Arc<dyn Store>) {
    s.enqueue("p1", JobKind::Build).await.unwrap();
    let lease = Duration::from_millis(300);
    assert!(s.claim("w", Lane::Quick, lease, now()).await.unwrap().is_none(), "a build is not a quick job");
    let dead = s.claim("dead-worker", Lane::Build, lease, now()).await.unwrap().unwrap();
    assert!(s.claim("w2", Lane::Build, lease, now()).await.unwrap().is_none(), "leased job is not handed out twice");
    tokio::time::sleep(Duration::from_millis(450)).await;
    let retry = s.claim("w2", Lane::Build, lease, now()).await.unwrap().expect("expired lease is retried");
    assert_eq!(retry.preview_id, "p1");
    assert_eq!(retry.job_id, dead.job_id);
    assert!(matches!(s.renew(&dead, lease, now()).await, Err(StoreError::LeaseLost(_))), "the dead worker lost it");
    s.renew(&retry, lease, now()).await.unwrap();
    s.complete(&retry).await.unwrap();
    assert!(s.jobs().await.unwrap().is_empty());
}

pub async fn enqueue_wakes_job_waiters(s: Arc<dyn Store>) {
    let waiter = {
        let s = s.clone();
        tokio::spawn(async move {
            let t0 = std::time::Instant::now();
            s.wait_for_jobs(Duration::from_secs(10)).await;
            t0.elapsed()
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.enqueue("woken", JobKind::Build).await.unwrap();
    let waited =
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("the enqueue woke the waiter").unwrap();
    assert!(waited < Duration::from_secs(5), "woken by the enqueue, not the timeout: {waited:?}");
}

pub async fn concurrent_enqueue_makes_one_job(s: Arc<dyn Store>) {
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move { s.enqueue("busy", JobKind::Wake).await.unwrap().created }));
    }
    let mut created = 0;
    for t in tasks {
        created += t.await.unwrap() as u32;
    }
    assert_eq!(created, 1);
    assert_eq!(s.jobs().await.unwrap(), vec![("busy".to_string(), JobKind::Wake)]);
}

pub async fn status_waits(s: Arc<dyn Store>) {
    let p = preview("w");
    s.put_preview(&p, None).await.unwrap();
    let t0 = std::time::Instant::now();
    let timed_out = s.wait_preview("w", 1, Duration::from_millis(200)).await.unwrap().unwrap();
    assert_eq!(timed_out.version, 1);
    assert!(t0.elapsed() >= Duration::from_millis(190));
    let waiter = {
        let s = s.clone();
        tokio::spawn(async move { s.wait_preview("w", 1, Duration::from_secs(10)).await.unwrap().unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut p2 = p.clone();
    p2.pinned = true;
    s.put_preview(&p2, Some(1)).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken by the write").unwrap();
    assert_eq!(got.version, 2);
    assert!(got.value.pinned);
    assert!(s.wait_preview("missing", 0, Duration::from_millis(10)).await.unwrap().is_none());
}

/// Table rows, and removal as an atomic take: of 32 concurrent takers of one row exactly
/// one wins (how provisioner replicas share a pool of ready machines).
pub async fn tables_take_once(s: Arc<dyn Store>) {
    assert_eq!(s.table_get("pool", "m1").await.unwrap(), None);
    s.table_put("pool", "m1", "100").await.unwrap();
    s.table_put("pool", "m2", "200").await.unwrap();
    s.table_put("other", "m1", "x").await.unwrap();
    assert_eq!(s.table_get("pool", "m1").await.unwrap().as_deref(), Some("100"));
    let mut rows = s.table_list("pool").await.unwrap();
    rows.sort();
    assert_eq!(rows, vec![("m1".to_string(), "100".to_string()), ("m2".to_string(), "200".to_string())]);
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move { s.table_remove("pool", "m1").await.unwrap() }));
    }
    let mut won = 0;
    for t in tasks {
        won += t.await.unwrap() as u32;
    }
    assert_eq!(won, 1);
    assert_eq!(s.table_list("pool").await.unwrap(), vec![("m2".to_string(), "200".to_string())]);
    assert_eq!(s.table_get("other", "m1").await.unwrap().as_deref(), Some("x"));
    assert!(s.table_list("empty").await.unwrap().is_empty());
}

pub async fn tables_compare_and_set(s: Arc<dyn Store>) {
    // a claim: only one of many concurrent puts on an absent row wins
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.table_swap("claims", "acme.com", None, Some(&format!("org{i}"))).await.unwrap()
        }));
    }
    let mut won = 0;
    for t in tasks {
        won += usize::from(t.await.unwrap());
    }
    assert_eq!(won, 1);
    let owner = s.table_get("claims", "acme.com").await.unwrap().unwrap();
    // a stale expected value writes nothing
    assert!(!s.table_swap("claims", "acme.com", Some("nobody"), Some("x")).await.unwrap());
    assert_eq!(s.table_get("claims", "acme.com").await.unwrap().as_deref(), Some(owner.as_str()));
    // the current value swaps, and removes
    assert!(s.table_swap("claims", "acme.com", Some(&owner), Some("{\"v\":2}")).await.unwrap());
    assert_eq!(s.table_get("claims", "acme.com").await.unwrap().as_deref(), Some("{\"v\":2}"));
    assert!(s.table_swap("claims", "acme.com", Some("{\"v\":2}"), None).await.unwrap());
    assert_eq!(s.table_get("claims", "acme.com").await.unwrap(), None);
    // removing an absent row that is expected absent is a no-op that succeeds
    assert!(s.table_swap("claims", "acme.com", None, None).await.unwrap());
    // an empty string is a value, not an absence
    assert!(s.table_swap("claims", "e", None, Some("")).await.unwrap());
    assert!(!s.table_swap("claims", "e", None, Some("x")).await.unwrap());
    assert!(s.table_swap("claims", "e", Some(""), Some("x")).await.unwrap());
}
