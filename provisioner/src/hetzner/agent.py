#!/usr/bin/env python3
"""Wakegate agent: runs on a preview server at every boot (systemd unit from cloud-init).

It pulls its work from the control plane, so nothing ever connects in to the machine:

  GET  {control}/v1/agent/work    200 {preview, git_url, git_ref, preview_url, preview_urls}: deploy or start
                                  204: wait (a pool machine nobody took yet; Retry-After says how long)
                                  410: this machine is not wanted; stay idle
  POST {control}/v1/agent/phase   {"phase": "checkout" | "build" | "start" | "health"}
  POST {control}/v1/agent/ready   {"port": N}
  POST {control}/v1/agent/failed  {"phase": ..., "reason": ...}

Every call carries `Authorization: Bearer <token>` and `X-Wakegate-Machine: <name>`.
The checkout and a marker of what was built stay on the disk, so a wake after a stop
or from a hibernation snapshot only starts the app again.
Python 3.11+ standard library only.
"""

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request

CFG = json.load(open(sys.argv[1] if len(sys.argv) > 1 else "/etc/wakegate/agent.json"))
ROOT = CFG.get("root", "/srv/wakegate")
PORT = int(CFG.get("port", 80))
HOST = CFG.get("host", "0.0.0.0")
SRC = os.path.join(ROOT, "src")
MARKER = os.path.join(ROOT, "deployed.json")
app = None


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(CFG["control"].rstrip("/") + path, data=data, method=method)
    req.add_header("Authorization", "Bearer " + CFG["token"])
    req.add_header("X-Wakegate-Machine", CFG["machine"])
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw else None), r.headers
    except urllib.error.HTTPError as e:
        return e.code, None, e.headers


def report(path, body):
    for attempt in range(30):
        try:
            status, _, _ = call("POST", path, body)
            if status < 500:
                return status
        except OSError as e:
            log(f"report {path} failed: {e}")
        time.sleep(min(2 ** attempt * 0.1, 5))
    return None


def tail(path, lines=30):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


class Failed(Exception):
    def __init__(self, phase, reason):
        super().__init__(reason)
        self.phase = phase
        self.reason = reason


def run(cmd, cwd, env=None, timeout=None):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError((out.stderr or out.stdout).strip()[-2000:])
    return out.stdout


def manifest():
    try:
        with open(os.path.join(SRC, "wakegate.toml"), "rb") as f:
            m = tomllib.load(f)
    except FileNotFoundError:
        raise Failed("checkout", "the repository has no wakegate.toml at its root")
    except tomllib.TOMLDecodeError as e:
        raise Failed("checkout", f"wakegate.toml: {e}")
    if not str(m.get("run", "")).strip():
        raise Failed("checkout", "wakegate.toml: run must not be empty")
    m.setdefault("health", "/")
    m.setdefault("build_timeout_secs", 600)
    m.setdefault("start_timeout_secs", 60)
    m.setdefault("env", {})
    return m


def app_env(m, work):
    env = dict(os.environ)
    env.update({k: str(v) for k, v in m["env"].items()})
    env.update({"PORT": str(PORT), "HOST": HOST, "PREVIEW_URL": work["preview_url"],
                "PREVIEW_URLS": ",".join(work.get("preview_urls") or [work["preview_url"]])})
    return env


def deploy(work):
    done = None
    try:
        done = json.load(open(MARKER))
    except (OSError, ValueError):
        pass
    if done == {"preview": work["preview"], "git_ref": work["git_ref"]}:
        return manifest()
    report("/v1/agent/phase", {"phase": "checkout"})
    subprocess.run(["rm", "-rf", SRC], check=True)
    os.makedirs(SRC)
    try:
        run(["git", "init", "-q"], SRC)
        fetch = ["git", "fetch", "-q", "--depth", "1", "--", work["git_url"], work["git_ref"]]
        auth = work.get("git_auth")
        env = None
        if auth:
            # the token reaches git through the environment, never a URL or an argument
            env = dict(os.environ, WAKEGATE_GIT_USERNAME=auth["username"], WAKEGATE_GIT_TOKEN=auth["token"])
            helper = ('!f() { test "$1" = get || exit 0; echo "username=${WAKEGATE_GIT_USERNAME}"; '
                      'echo "password=${WAKEGATE_GIT_TOKEN}"; }; f')
            # answered for the repository's host only
            scoped = "credential." + auth["origin"] + ".helper=" + helper
            fetch = fetch[:1] + ["-c", "credential.helper=", "-c", scoped] + fetch[1:]
        run(fetch, SRC, env=env, timeout=600)
        run(["git", "checkout", "-q", "--detach", "FETCH_HEAD"], SRC)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        raise Failed("checkout", f"cannot fetch {work['git_ref']}: {e}")
    m = manifest()
    if m.get("build"):
        report("/v1/agent/phase", {"phase": "build"})
        with open(os.path.join(ROOT, "build.log"), "w") as logf:
            try:
                p = subprocess.run(["sh", "-c", m["build"]], cwd=SRC, env=app_env(m, work), stdout=logf,
                                   stderr=subprocess.STDOUT, timeout=m["build_timeout_secs"])
            except subprocess.TimeoutExpired:
                raise Failed("build", f"build timed out after {m['build_timeout_secs']}s")
        if p.returncode != 0:
            raise Failed("build", f"build failed (exit {p.returncode}):\n" + tail(os.path.join(ROOT, "build.log")))
    with open(MARKER, "w") as f:
        json.dump({"preview": work["preview"], "git_ref": work["git_ref"]}, f)
    return m


def healthy(path):
    try:
        probe = "127.0.0.1" if HOST in ("0.0.0.0", "::") else HOST
        with urllib.request.urlopen(f"http://{probe}:{PORT}{path}", timeout=2) as r:
            return r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except OSError:
        return False


def start(m, work):
    global app
    report("/v1/agent/phase", {"phase": "start"})
    logf = open(os.path.join(ROOT, "app.log"), "a")
    # the app stays in the agent's process group (and systemd's cgroup): stopping the
    # agent stops it
    app = subprocess.Popen(["sh", "-c", m["run"]], cwd=SRC, env=app_env(m, work), stdout=logf,
                           stderr=subprocess.STDOUT)
    report("/v1/agent/phase", {"phase": "health"})
    deadline = time.monotonic() + m["start_timeout_secs"]
    while time.monotonic() < deadline:
        if app.poll() is not None:
            raise Failed("start", f"the app exited ({app.returncode}) before answering:\n"
                         + tail(os.path.join(ROOT, "app.log")))
        if healthy(m["health"]):
            return
        time.sleep(0.05)
    raise Failed("health", f"GET {m['health']} did not answer within {m['start_timeout_secs']}s:\n"
                 + tail(os.path.join(ROOT, "app.log")))


def stop_app(*_):
    if app is not None and app.poll() is None:
        app.terminate()
        try:
            app.wait(timeout=10)
        except subprocess.TimeoutExpired:
            app.kill()
    sys.exit(0)


def main():
    signal.signal(signal.SIGTERM, stop_app)
    os.makedirs(ROOT, exist_ok=True)
    backoff = 0.2
    while True:
        try:
            status, work, headers = call("GET", "/v1/agent/work")
        except OSError as e:
            log(f"control plane unreachable: {e}")
            time.sleep(backoff)
            backoff = min(backoff * 2, 10)
            continue
        backoff = 0.2
        if status == 200:
            break
        if status == 410:
            log("this machine is not wanted; idle")
            while True:
                time.sleep(3600)
        time.sleep(float(headers.get("Retry-After", "1")) if headers else 1)
    log(f"work: {work['preview']} at {work['git_ref']}")
    try:
        m = deploy(work)
        start(m, work)
    except Failed as f:
        log(f"failed in {f.phase}: {f.reason}")
        report("/v1/agent/failed", {"phase": f.phase, "reason": f.reason})
        stop_app()
    report("/v1/agent/ready", {"port": PORT})
    log("ready")
    code = app.wait()
    log(f"the app exited ({code})")
    # the control plane marks the preview failed (its page offers a retry) instead of
    # sending visitors to a dead port
    report("/v1/agent/exited", {"reason": f"the app exited ({code}) while running:\n"
                                          + tail(os.path.join(ROOT, "app.log"))})
    sys.exit(1)


if __name__ == "__main__":
    main()
