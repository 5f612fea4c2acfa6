//! `git ls-remote` against a remote that never answers: forty concurrent questions
//! start one `git` process tree, its timeout ends the whole tree (the
//! `git-remote-http` helper included), and the failure is remembered, so the next
//! forty questions start nothing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wakegate_waker::refs::{GitRefs, RefChecker};

/// Processes whose command line mentions `needle`, other than this test.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                out.push(format!("{name}: {cmd}"));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_remote_costs_one_process_tree_and_leaves_nothing_behind() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let server = {
        let accepted = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                held.push(s); // read nothing, answer nothing
            }
        })
    };
    let url = format!("http://127.0.0.1:{port}/repo.git");
    let refs = GitRefs::with_timeout(Duration::from_secs(1), Duration::from_secs(2));
    let ask = |n| {
        let (refs, url) = (refs.clone(), url.clone());
        async move {
            let calls: Vec<_> = (0..n)
                .map(|_| {
                    let (refs, url) = (refs.clone(), url.clone());
                    tokio::spawn(async move { refs.exists(&url, "main").await })
                })
                .collect();
            let mut answers = Vec::new();
            for c in calls {
                answers.push(c.await.unwrap());
            }
            answers
        }
    };
    let round = tokio::spawn(ask(40));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let running = processes_mentioning(&format!("127.0.0.1:{port}"));
    // git, `git remote-http` and `git-remote-http`: one tree, not forty
    assert!(!running.is_empty() && running.len() <= 3, "one process tree, not forty: {running:?}");
    let answers = round.await.unwrap();
    assert!(answers.iter().all(|a| a.as_ref().is_err_and(|e| e.contains("timed out"))), "{answers:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left = processes_mentioning(&format!("127.0.0.1:{port}"));
    assert!(left.is_empty(), "the timed-out process group is gone: {left:?}");
    let connections = accepted.load(Ordering::SeqCst);
    assert_eq!(connections, 1, "one connection for forty questions");

    // the failure is remembered: asking again starts nothing
    let answers = ask(40).await;
    assert!(answers.iter().all(Result::is_err));
    assert_eq!(accepted.load(Ordering::SeqCst), connections);
    server.abort();
}
