//! The operator's CLI driven as an operator would: the real binary against a running
//! waker, its table in a pseudo-terminal, every preview command, logs followed, the
//! config file, completions, and the errors people make.

use crate::common;

use common::{run_in_pty, OnPty, World, APP, MAIN};
use serde_json::Value;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;
use wakegate_testkit::git::Repo;

/// The CLI with the world's waker and token in the environment, and no config file.
fn command(w: &World, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wakegate"));
    c.args(args)
        .env("WAKEGATE_WAKER_URL", format!("http://{}", w.dev.waker_addr))
        .env("WAKEGATE_OPERATOR_TOKEN", &w.dev.operator_token)
        .env("WAKEGATE_CONFIG", w.data.join("no-such-config.toml"))
        .stdin(Stdio::null());
    c
}

/// Runs it to the end: stdout, stderr, success.
fn run(mut c: Command) -> (String, String, bool) {
    let out = c.output().unwrap();
    (String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into(), out.status.success())
}

fn ok(w: &World, args: &[&str]) -> String {
    let (out, err, ok) = run(command(w, args));
    assert!(ok, "wakegate {args:?} failed: {err}");
    out
}

fn fails(c: Command) -> String {
    let (_, err, ok) = run(c);
    assert!(!ok, "should have failed");
    err
}

/// Runs it with stdout on a pseudo-terminal of `cols` columns: what the terminal showed.
fn in_pty(w: &World, args: &[&str], cols: u16) -> String {
    let (screen, ok) = run_in_pty(command(w, args), OnPty::Stdout, Some(cols));
    assert!(ok, "wakegate {args:?} failed");
    screen.replace("\r\n", "\n")
}

fn show(w: &World, preview: &str) -> Value {
    serde_json::from_str(&ok(w, &["previews", "show", preview, "--json"])).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_runs_every_preview_command_from_the_cli() {
    let w = World::start().await;
    // a project whose build says something, created through the CLI
    let manifest = "build = \"echo compiling the demo && python3 -m py_compile app.py\"\n\
                    run = \"exec python3 app.py\"\nhealth = \"/health\"\n[env]\nPYTHONUNBUFFERED = \"1\"\n";
    let repo = Repo::new(&[("app.py", APP), ("wakegate.toml", manifest), ("content.html", MAIN)]);
    let out = tokio::task::block_in_place(|| {
        ok(&w, &["projects", "create", "loud", &repo.url(), "--ttl-hours", "12", "--idle-timeout-secs", "900"])
    });
    assert!(out.contains("project loud created"), "{out}");
    let out = tokio::task::block_in_place(|| ok(&w, &["projects", "ls"]));
    assert!(out.contains("loud") && out.contains("demo") && out.contains("12 h"), "{out}");

    let out = tokio::task::block_in_place(|| ok(&w, &["previews", "create", "loud", "main"]));
    assert!(out.contains("loud/main: created"), "{out}");
    let id = w.op("GET", "/v1/previews", None).await.1.as_array().unwrap()[0]["id"].as_str().unwrap().to_string();
    w.wait_state(&id, "running").await;
    let demo = w.running("main").await;
    w.visit(&demo, "/").await;
    // the edge reports visits in batches
    let demo_id = demo["id"].as_str().unwrap();
    for _ in 0..100 {
        if w.show(demo_id).await["last_visit_at"].is_u64() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // the table, as a terminal shows it
    let screen = tokio::task::block_in_place(|| in_pty(&w, &["previews", "ls"], 160));
    let lines: Vec<&str> = screen.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 3, "a header and two rows:\n{screen}");
    for col in ["PROJECT", "REF", "STATE", "URL", "TTL LEFT", "LAST VISIT"] {
        assert!(lines[0].contains(col), "{screen}");
    }
    assert!(lines[1].contains("demo") && lines[1].contains("running") && lines[1].contains("just now"), "{screen}");
    assert!(lines[1].contains(demo["url"].as_str().unwrap()), "{screen}");
    assert!(lines[2].contains("loud") && lines[2].contains("never") && lines[2].contains("11h"), "{screen}");
    // a narrow terminal wraps cells rather than losing them
    let narrow = tokio::task::block_in_place(|| in_pty(&w, &["previews", "ls", "--project", "loud"], 60));
    assert!(narrow.lines().all(|l| l.chars().count() <= 60), "{narrow}");
    assert!(!narrow.contains("demo"), "{narrow}");
    // JSON for scripts
    let json: Value =
        serde_json::from_str(&tokio::task::block_in_place(|| ok(&w, &["previews", "ls", "--json"]))).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);

    tokio::task::block_in_place(|| {
        // by id or by project/ref
        let shown = ok(&w, &["previews", "show", "loud/main"]);
        for field in ["last deploy", "last visit", "TTL left", "running", &id] {
            assert!(shown.contains(field), "{field}: {shown}");
        }
        assert_eq!(show(&w, &id)["id"], id.as_str());

        assert!(ok(&w, &["previews", "pin", "loud/main"]).contains("pinned"));
        assert_eq!(show(&w, &id)["pinned"], true);
        assert!(in_pty(&w, &["previews", "ls", "--project", "loud"], 160).contains("pinned"));
        ok(&w, &["previews", "unpin", "loud/main"]);
        assert_eq!(show(&w, &id)["pinned"], false);
        ok(&w, &["previews", "ttl", "loud/main", "2.5"]);
        assert_eq!(show(&w, &id)["ttl_hours"], 2.5);
        ok(&w, &["previews", "ttl", "loud/main", "project"]);
        assert_eq!(show(&w, &id)["ttl_hours"], 12.0);

        // the build's output and the app's, through the store from any waker
        let logs = ok(&w, &["logs", "loud/main"]);
        assert!(logs.contains("==> build <==") && logs.contains("compiling the demo"), "{logs}");
        assert!(logs.contains("==> app <==") && logs.contains("demo app listening"), "{logs}");
        let app = ok(&w, &["logs", "loud/main", "--stream", "app"]);
        assert!(!app.contains("compiling the demo") && app.contains("demo app listening"), "{app}");
    });

    // --follow prints what comes: a wake starts the app again, which logs again
    let mut follow =
        command(&w, &["logs", "loud/main", "--stream", "app", "--follow"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdout = follow.stdout.take().unwrap();
    let seen = std::thread::spawn(move || {
        let mut text = String::new();
        let mut buf = [0u8; 1024];
        // two "listening" lines: the first start, and the one after the wake
        while text.matches("demo app listening").count() < 2 {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        text
    });
    tokio::task::block_in_place(|| {
        assert!(ok(&w, &["previews", "sleep", "loud/main"]).contains("going to sleep"));
    });
    w.wait_state(&id, "sleeping").await;
    let woke = tokio::task::block_in_place(|| ok(&w, &["previews", "wake", "loud/main", "--wait"]));
    assert!(woke.contains("waking") && woke.contains("http://"), "{woke}");
    assert_eq!(w.show(&id).await["state"], "running");
    for _ in 0..100 {
        if seen.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    follow.kill().unwrap();
    follow.wait().unwrap();
    let followed = seen.join().unwrap();
    assert_eq!(followed.matches("demo app listening").count(), 2, "{followed}");

    tokio::task::block_in_place(|| {
        assert!(ok(&w, &["previews", "erase", "loud/main"]).contains("erasing"));
    });
    w.wait_state(&id, "erased").await;
    let rebuilt = tokio::task::block_in_place(|| ok(&w, &["previews", "rebuild", "loud/main", "--wait"]));
    assert!(rebuilt.contains("rebuilding") && rebuilt.contains("http://"), "{rebuilt}");
    assert_eq!(w.show(&id).await["state"], "running");

    tokio::task::block_in_place(|| {
        // the config file, with the token in a file of its own
        let token_file = w.data.join("token");
        std::fs::write(&token_file, format!("{}\n", w.dev.operator_token)).unwrap();
        let config = w.data.join("config.toml");
        std::fs::write(
            &config,
            format!("server = \"http://{}\"\ntoken_file = \"{}\"\n", w.dev.waker_addr, token_file.display()),
        )
        .unwrap();
        let mut c = command(&w, &["previews", "ls", "--json"]);
        c.env_remove("WAKEGATE_WAKER_URL").env_remove("WAKEGATE_OPERATOR_TOKEN").env("WAKEGATE_CONFIG", &config);
        let (out, err, ok_) = run(c);
        assert!(ok_, "{err}");
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap().as_array().unwrap().len(), 2);
        // flags win over the environment
        let mut c = command(&w, &["previews", "ls", "--token", "wrong"]);
        c.env("WAKEGATE_CONFIG", &config);
        assert!(fails(c).contains("refused the operator token"));

        // the mistakes people make get a clear answer
        let mut c = command(&w, &["previews", "ls"]);
        c.env("WAKEGATE_OPERATOR_TOKEN", "not-the-token");
        assert!(fails(c).contains("the waker refused the operator token (401)"));
        let err = fails(command(&w, &["previews", "ls", "--server", "http://127.0.0.1:1"]));
        assert!(err.contains("cannot reach the waker at http://127.0.0.1:1") && err.contains("refused"), "{err}");
        let mut c = command(&w, &["previews", "ls"]);
        c.env_remove("WAKEGATE_OPERATOR_TOKEN");
        assert!(fails(c).contains("no operator token"));
        let mut c = command(&w, &["previews", "ls"]);
        std::fs::write(w.data.join("bad.toml"), "srever = \"x\"\n").unwrap();
        c.env("WAKEGATE_CONFIG", w.data.join("bad.toml"));
        assert!(fails(c).contains("bad.toml"));
        assert!(fails(command(&w, &["previews", "pin", "loud/nope"])).contains("no preview of nope in project loud"));
        assert!(fails(command(&w, &["previews", "pin", "what"])).contains("project/ref"));
        assert!(fails(command(&w, &["previews", "ttl", "loud/main", "forever"])).contains("a number or `project`"));
        let err = fails(command(&w, &["previews", "ttl", "loud/main", "100000"]));
        assert!(err.contains("ttl_hours"), "{err}");
        let err = fails(command(&w, &["previews", "sleep", "pv-none"]));
        assert!(err.contains("no preview") || err.contains("not found"), "{err}");
        assert!(fails(command(&w, &["logs", "loud/main", "--stream", "db"])).contains("invalid value"));

        // completions for the shells
        let bash = ok(&w, &["completions", "bash"]);
        assert!(bash.contains("_wakegate") && bash.contains("previews"), "{}", &bash[..200.min(bash.len())]);
        assert!(ok(&w, &["completions", "zsh"]).contains("#compdef wakegate"));
    });
    w.stop().await;
}
