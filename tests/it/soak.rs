//! Soak: 1,000 previews across 20 projects on two `wakegate waker` and two `wakegate
//! provisioner` processes sharing one Redis (local backend: every preview is a real
//! process). Random creates, sleeps, wakes, erases, rebuilds and app crashes (kill -9)
//! keep at most ~45 previews building or running at once; Redis is restarted in the
//! middle. Afterwards every preview is in a settled state that agrees with what runs:
//! every record a 201 acknowledged is there, every running preview's app answers, no
//! sleeping or erased one has a process, no machine directory or process is left that
//! no preview holds, both replicas of each part are still up, and no log has a panic.
//!
//! Bounded: at most 4,500 events and 6 minutes of them, then at most 3 minutes to settle.

use crate::common;

use common::*;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use wakegate_core::lifecycle::{Phase, State};
use wakegate_provisioner::local::group_alive;
use wakegate_store::Store;
use wakegate_testkit::{free_port, git::Repo, http, redis::RedisServer, Proc, Rng};

const PREVIEWS: usize = 1000;
const PROJECTS: usize = 20;
const REFS: usize = PREVIEWS / PROJECTS;
/// Most previews building, waking or running at once (this machine has two cores).
const MAX_ACTIVE: usize = 45;
const MAX_EVENTS: usize = 4500;
const EVENT_TIME: Duration = Duration::from_secs(360);
const SETTLE: Duration = Duration::from_secs(180);
const TOKEN: &str = "operator-token-for-the-soak-test";

/// The app: no build step, Python's own file server, ready as soon as it listens.
const MANIFEST: &str = "run = \"exec python3 -S -m http.server $PORT --bind 127.0.0.1\"\nhealth = \"/\"\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Known {
    /// Building, waking or running, as far as the test knows.
    Active,
    Asleep,
    /// Erased: a rebuild brings it back.
    Erased,
    /// Its app was killed: it fails, and a rebuild brings it back.
    Crashed,
}

struct Preview {
    id: String,
    known: Known,
}

fn pick(rng: &mut Rng, previews: &[Preview], known: &[Known]) -> Option<usize> {
    let matching: Vec<usize> = (0..previews.len()).filter(|i| known.contains(&previews[*i].known)).collect();
    (!matching.is_empty()).then(|| matching[rng.below(matching.len() as u64) as usize])
}

/// Ends the apps the provisioners started, also when an assertion fails.
struct EndApps(PathBuf);

impl Drop for EndApps {
    fn drop(&mut self) {
        for dir in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            wakegate_testkit::kill_recorded_group(&dir.path().join("app.pid"));
            wakegate_testkit::kill_recorded_group(&dir.path().join("build.pid"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_previews_on_two_replicas_of_each_part_through_a_redis_restart() {
    let mut redis = RedisServer::start_persistent().await.unwrap();
    let data = wakegate_testkit::tempdir("soak");
    let machines = data.join("machines");
    let _end_apps = EndApps(machines.clone());
    let logs = data.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let repo = Repo::new(&[("wakegate.toml", MANIFEST), ("index.html", "main")]);
    for r in 0..REFS {
        repo.branch(&format!("change-{r}"), &[("index.html", &format!("change {r}"))]);
    }

    let wakers: Vec<SocketAddr> = (0..2).map(|_| SocketAddr::from(([127, 0, 0, 1], free_port()))).collect();
    let spawn = |part: &str, n: usize, waker: SocketAddr| {
        let log = std::fs::File::create(logs.join(format!("{part}-{n}.log"))).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wakegate"));
        cmd.arg(part).stdout(log.try_clone().unwrap()).stderr(log);
        for (k, v) in [
            ("WAKEGATE_REDIS_URL", redis.url()),
            ("WAKEGATE_DATA", data.display().to_string()),
            ("WAKEGATE_WAKER_ADDR", waker.to_string()),
            ("WAKEGATE_EDGE_KEY", TEST_EDGE_KEY.to_string()),
            ("WAKEGATE_CSRF_KEY", TEST_CSRF_KEY.to_string()),
            ("WAKEGATE_ORIGIN_KEY", TEST_ORIGIN_KEY.to_string()),
            ("WAKEGATE_OPERATOR_TOKEN", TOKEN.to_string()),
            ("WAKEGATE_SWEEP_SECS", "0.5".to_string()),
            ("WAKEGATE_LIVENESS_SECS", "0.5".to_string()),
            ("WAKEGATE_CLOUD_LIST_SECS", "1".to_string()),
            ("WAKEGATE_CLOUD_REQUESTS_PER_HOUR", "100000".to_string()),
            ("WAKEGATE_ORPHAN_GRACE_SECS", "5".to_string()),
        ] {
            cmd.env(k, v);
        }
        Proc(cmd.spawn().unwrap())
    };
    let mut parts = vec![
        spawn("waker", 0, wakers[0]),
        spawn("waker", 1, wakers[1]),
        spawn("provisioner", 0, wakers[0]),
        spawn("provisioner", 1, wakers[1]),
    ];
    for w in &wakers {
        wakegate_testkit::eventually(WAIT, "waker to listen", || async {
            http::send(*w, "GET", "w", "/healthz", &[], "").await.ok().filter(|r| r.status == 200)
        })
        .await;
    }
    // operator calls alternate between the two waker replicas
    let mut turn = 0usize;
    let mut op = |method: &'static str, path: String, body: Option<Value>| {
        turn += 1;
        let waker = wakers[turn % 2];
        async move {
            match wakegate::operator::call(waker, TOKEN, method, &path, body).await {
                Ok(r) => r,
                Err(e) => (0, json!({ "error": e.to_string() })),
            }
        }
    };
    for p in 0..PROJECTS {
        let body = json!({"name": format!("p{p}"), "git_url": repo.url(), "idle_timeout_secs": 86_400});
        let (s, v) = op("POST", "/v1/projects".into(), Some(body)).await;
        assert_eq!(s, 201, "{v}");
    }

    // the test reads records straight from Redis
    let store = wakegate_store::RedisStore::connect(&redis.url(), "wg:").await.unwrap();
    let seed = 0x50A4_u64 ^ std::process::id() as u64;
    eprintln!("soak seed {seed:#x}");
    let mut rng = Rng::new(seed);
    let mut previews: Vec<Preview> = Vec::new();
    let mut statuses: HashMap<(&'static str, u16), usize> = HashMap::new();
    let mut unexpected = Vec::new();
    let mut crashes = 0;
    let mut restarted: Option<Instant> = None;
    let began = Instant::now();
    let mut events = 0;
    while events < MAX_EVENTS && began.elapsed() < EVENT_TIME {
        events += 1;
        if restarted.is_none() && previews.len() >= PREVIEWS / 2 {
            // Redis goes away under all four processes and comes back, with calls on
            // both wakers under way meanwhile: each is answered, 200 or 503
            let calls = async {
                let mut answers = Vec::new();
                for n in 0..40 {
                    let r = wakegate::operator::call(wakers[n % 2], TOKEN, "GET", "/v1/projects", None).await;
                    answers.push(r.map(|r| r.0).unwrap_or(0));
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                answers
            };
            let (restart, answers) = tokio::join!(redis.restart(Duration::from_millis(500)), calls);
            restart.unwrap();
            assert!(answers.iter().all(|s| *s == 200 || *s == 503), "during the restart: {answers:?}");
            eprintln!("answers while Redis restarted: {answers:?}");
            restarted = Some(Instant::now());
        }
        let active = previews.iter().filter(|p| p.known == Known::Active).count();
        let roll = rng.below(100);
        let (kind, target) = if active >= MAX_ACTIVE {
            let i = pick(&mut rng, &previews, &[Known::Active]).unwrap();
            (if roll < 75 { "sleep" } else { "erase" }, Some(i))
        } else if roll < 50 && previews.len() < PREVIEWS {
            ("create", None)
        } else if roll < 62 {
            ("wake", pick(&mut rng, &previews, &[Known::Asleep]))
        } else if roll < 72 {
            ("rebuild", pick(&mut rng, &previews, &[Known::Erased, Known::Crashed]))
        } else if roll < 80 {
            ("crash", pick(&mut rng, &previews, &[Known::Active]))
        } else if roll < 92 {
            ("sleep", pick(&mut rng, &previews, &[Known::Active]))
        } else {
            ("erase", (!previews.is_empty()).then(|| rng.below(previews.len() as u64) as usize))
        };
        let (status, body) = match (kind, target) {
            ("create", _) => {
                let n = previews.len();
                let body = json!({"ref": format!("change-{}", n / PROJECTS)});
                let r = op("POST", format!("/v1/projects/p{}/previews", n % PROJECTS), Some(body)).await;
                // 200: it was created by an earlier call whose answer was lost
                if r.0 == 201 || r.0 == 200 {
                    previews.push(Preview { id: r.1["id"].as_str().unwrap().to_string(), known: Known::Active });
                }
                r
            }
            ("crash", Some(i)) => {
                // the app of a running preview dies (kill -9 of its process group)
                let running_on = match store.get_preview(&previews[i].id).await {
                    Ok(Some(p)) => match p.value.state {
                        State::Running { machine, .. } => Some(machines.join(machine)),
                        _ => None,
                    },
                    _ => None,
                };
                match running_on {
                    Some(dir) if group_alive(&dir, "app.pid").await => {
                        wakegate_testkit::kill_recorded_group(&dir.join("app.pid"));
                        previews[i].known = Known::Crashed;
                        crashes += 1;
                        (200, Value::Null)
                    }
                    _ => (0, Value::Null),
                }
            }
            (_, Some(i)) => {
                let r = op("POST", format!("/v1/previews/{}/{kind}", previews[i].id), None).await;
                if r.0 == 202 {
                    previews[i].known = match kind {
                        "sleep" => Known::Asleep,
                        "erase" => Known::Erased,
                        _ => Known::Active,
                    };
                }
                r
            }
            (_, None) => (0, Value::Null),
        };
        if status != 0 || kind != "crash" {
            *statuses.entry((kind, status)).or_default() += 1;
        }
        // the answers the API documents for these calls; 503 only while Redis comes back
        let documented = match status {
            // an event with nothing to act on was skipped; a create always has
            0 => kind != "create" && (target.is_none() || kind == "crash"),
            200 | 201 | 202 | 409 => true,
            503 => restarted.is_some_and(|at| at.elapsed() < Duration::from_secs(30)),
            _ => false,
        };
        if !documented {
            unexpected.push(format!("{kind}: {status} {body}"));
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    eprintln!(
        "soak: {events} events in {:?}, {} previews, {crashes} apps killed; answers {statuses:?}",
        began.elapsed(),
        previews.len()
    );
    assert!(unexpected.is_empty(), "answers outside the documented ones: {unexpected:#?}");
    assert!(restarted.is_some(), "Redis was restarted mid-run");
    assert_eq!(previews.len(), PREVIEWS, "every preview was created within the bound");

    // settle: every preview in a resting state
    let settle_began = Instant::now();
    let settled = loop {
        let all = store.list_previews().await.unwrap();
        let moving = all
            .iter()
            .filter(|p| {
                !matches!(
                    p.value.state,
                    State::Running { .. } | State::Sleeping { .. } | State::Erased { .. } | State::Failed { .. }
                )
            })
            .count();
        if moving == 0 {
            break all;
        }
        assert!(
            settle_began.elapsed() < SETTLE,
            "{moving} previews still moving after {SETTLE:?}: {:?}",
            all.iter().map(|p| p.value.state.as_str()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // no lost record: everything a 201 acknowledged is there
    let ids: HashSet<&str> = settled.iter().map(|p| p.value.id.as_str()).collect();
    let lost: Vec<&str> = previews.iter().map(|p| p.id.as_str()).filter(|id| !ids.contains(id)).collect();
    assert!(lost.is_empty(), "records lost: {lost:?}");
    let mut by_state: HashMap<&'static str, usize> = HashMap::new();
    for p in &settled {
        *by_state.entry(p.value.state.as_str()).or_default() += 1;
    }
    eprintln!("settled in {:?}: {by_state:?}", settle_began.elapsed());

    // what runs agrees with the records, once the reaper has had its grace period and
    // liveness has seen the last crashes; records are read afresh each round
    let reap_began = Instant::now();
    let settled = loop {
        let all = store.list_previews().await.unwrap();
        let held: HashMap<String, &State> = all
            .iter()
            .flat_map(|p| p.value.state.machines().into_iter().map(move |m| (m.clone(), &p.value.state)))
            .collect();
        let mut disagree = Vec::new();
        for p in &all {
            if !matches!(
                p.value.state,
                State::Running { .. } | State::Sleeping { .. } | State::Erased { .. } | State::Failed { .. }
            ) {
                disagree.push(format!("{}: still {}", p.value.id, p.value.state.as_str()));
            }
        }
        for dir in std::fs::read_dir(&machines).unwrap().flatten().map(|e| e.path()) {
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            let alive = group_alive(&dir, "app.pid").await || group_alive(&dir, "build.pid").await;
            match held.get(&name) {
                None => disagree.push(format!("{name}: no preview holds it (alive: {alive})")),
                Some(State::Running { .. }) if !alive => disagree.push(format!("{name}: running without an app")),
                Some(State::Sleeping { .. }) if alive => disagree.push(format!("{name}: asleep with a live app")),
                Some(_) => {}
            }
        }
        for (m, state) in &held {
            if !machines.join(m).exists() {
                disagree.push(format!("{m}: held by a {} preview but gone", state.as_str()));
            }
        }
        if disagree.is_empty() {
            break all;
        }
        assert!(
            reap_began.elapsed() < Duration::from_secs(60),
            "the machines disagree with the records: {disagree:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // every running preview's app answers at its origin
    for p in &settled {
        if let State::Running { origin, .. } = &p.value.state {
            let addr: SocketAddr = origin.trim_start_matches("http://").parse().unwrap();
            let r = http::send(addr, "GET", "app", "/", &[], "").await.unwrap();
            assert_eq!(r.status, 200, "{} at {origin}", p.value.id);
        }
    }
    // each preview ended where the last thing done to it leads
    let by_id: HashMap<&str, &State> = settled.iter().map(|p| (p.value.id.as_str(), &p.value.state)).collect();
    let mut wrong = Vec::new();
    for p in &previews {
        let state = by_id[p.id.as_str()];
        let fits = match p.known {
            Known::Active => matches!(state, State::Running { .. }),
            Known::Asleep => matches!(state, State::Sleeping { .. }),
            Known::Erased => matches!(state, State::Erased { .. }),
            Known::Crashed => matches!(state, State::Failed { phase: Phase::Run, .. }),
        };
        if !fits {
            wrong.push(format!("{}: {:?} but {state:?}", p.id, p.known));
        }
    }
    assert!(wrong.is_empty(), "{} previews not where their last event leads: {wrong:#?}", wrong.len());
    for state in ["running", "sleeping", "erased", "failed"] {
        assert!(by_state.get(state).is_some_and(|n| *n > 0), "some previews end {state}: {by_state:?}");
    }

    // both replicas of each part lived through it all, and nothing panicked
    for p in &mut parts {
        assert!(p.0.try_wait().unwrap().is_none(), "a part exited");
    }
    drop(parts);
    for log in std::fs::read_dir(&logs).unwrap().flatten() {
        let text = std::fs::read_to_string(log.path()).unwrap();
        assert!(!text.contains("panicked"), "{}: {}", log.path().display(), text);
    }
}
