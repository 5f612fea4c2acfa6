#!/usr/bin/env python3
"""Wakegate agent: runs on a preview server at every boot (systemd unit from cloud-init).

It pulls its work from the control plane, so nothing ever connects in to the machine:

  GET  {control}/v1/agent/work    200 {preview, git_url, git_ref, preview_url, preview_urls}: deploy or start
                                  204: wait (a pool machine nobody took yet; Retry-After says how long)
                                  410: this machine is not wanted; stay idle
  POST {control}/v1/agent/phase   {"phase": "checkout" | "build" | "start" | "health"}
  POST {control}/v1/agent/ready   {"port": N}
  POST {control}/v1/agent/failed  {"phase": ..., "reason": ...}
  POST {control}/v1/agent/dump    {"recipe": {engine, name, sanitize} | null, "image": id | null}
                                  200 {use_image, id}: the database image on this disk fits,
                                  start it; 200 {id, engine, url, size, gzip}: the dump to
                                  import, a presigned URL good for minutes; 204: none, start empty
  POST {control}/v1/agent/db      {recipe, dump, image, method, took_ms}: how the database was made
  POST {control}/v1/agent/progress {"done": bytes, "total": bytes} of the dump restored
  GET  {control}/v1/agent/pull    200 {key, url}: dump the database as .sql.gz and PUT it to
                                  url (`wakegate db pull`); 204: nothing (Retry-After)
  POST {control}/v1/agent/pull    {"key": ..., "size": N} once uploaded, or {"key", "reason"}
  POST {control}/v1/agent/baked   {"image", "size", "version"} or {"image", "reason"}: a builder's
                                  bake (its work is {"bake": {image, recipe, dump}})

Every call carries `Authorization: Bearer <token>` and `X-Wakegate-Machine: <name>`.
The checkout and a marker of what was built stay on the disk, so a wake after a stop
or from a hibernation snapshot only starts the app again.

A `[database]` in wakegate.toml gives the preview its own PostgreSQL or MariaDB server
on this machine (loopback only): a fresh data directory under the root, filled from the
project's dump streamed from S3 through gunzip into the engine's client, then
sanitized. It stays on the disk, so sleep and hibernation keep it; the deploy marker is
written only after it is complete, so a restore cut short starts over from scratch.

A *builder* (work {"bake": ...}) makes a database image: it imports the dump into a fresh
data directory, runs the recipe's sanitize SQL, stops the server cleanly and moves the
directory to `db-image/` under the root with the credentials in `image.json`; the
control plane then snapshots the disk. A machine created from that snapshot starts its
preview's database straight from `db-image/` (when the control plane says it fits the
branch's recipe), with new passwords; otherwise it removes it and imports.
Python 3.11+ standard library only.
"""

import gzip
import http.client
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
import zlib

CFG = json.load(open(sys.argv[1] if len(sys.argv) > 1 else "/etc/wakegate/agent.json"))
ROOT = CFG.get("root", "/srv/wakegate")
PORT = int(CFG.get("port", 80))
HOST = CFG.get("host", "0.0.0.0")
SRC = os.path.join(ROOT, "src")
MARKER = os.path.join(ROOT, "deployed.json")
DB = os.path.join(ROOT, "db")
DB_FILE = os.path.join(ROOT, "db.json")
IMAGE = os.path.join(ROOT, "db-image")
IMAGE_FILE = os.path.join(IMAGE, "image.json")
MAX_SANITIZE = 1 << 20  # the control plane's limit on a recipe's sanitize SQL
app = None
db_server = None
dbf = None  # the preview's database: engine, name, env, port, credentials


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def call(method, path, body=None, timeout=30, raw=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(CFG["control"].rstrip("/") + path, data=data, method=method)
    req.add_header("Authorization", "Bearer " + CFG["token"])
    req.add_header("X-Wakegate-Machine", CFG["machine"])
    if data is not None:
        req.add_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw else None), r.headers
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read() or b"null")
        except (OSError, ValueError):
            detail = None
        return e.code, detail, e.headers


phase_now = "checkout"  # the last phase reported: where an unexpected error happened


def report(path, body):
    global phase_now
    if path == "/v1/agent/phase":
        phase_now = body["phase"]
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
    if dbf is not None:
        env.update(db_env(dbf))
    return env


# ---- the preview's database ------------------------------------------------------------

LABELS = {"postgres": "PostgreSQL", "mariadb": "MariaDB"}
# away from the distributions' own servers' ports, should a package have started one
DEFAULT_DB_PORTS = {"postgres": 15432, "mariadb": 13306}
PACKAGES = {"postgres": ["postgresql", "postgresql-client"], "mariadb": ["mariadb-server", "mariadb-client"]}
DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
RESERVED_DB_NAMES = {"postgres", "template0", "template1", "mysql", "information_schema", "performance_schema", "sys"}
ADMIN = "wakegate"
installing = set()


def database(m):
    """The manifest's [database], checked as the control plane checks it; None without one."""
    d = m.get("database")
    if d is None:
        return None
    bad = lambda what: Failed("checkout", f"wakegate.toml: {what}")
    if not isinstance(d, dict):
        raise bad("[database] must be a table")
    unknown = sorted(set(d) - {"engine", "name", "env", "sanitize"})
    if unknown:
        raise bad(f"unknown key database.{unknown[0]}")
    engine = d.get("engine")
    engine = {"postgres": "postgres", "mariadb": "mariadb", "mysql": "mariadb"}.get(engine if isinstance(engine, str) else "")
    if engine is None:
        raise bad('database.engine must be "postgres" or "mariadb"')
    name = d.get("name", "app")
    if not isinstance(name, str) or not DB_NAME.fullmatch(name):
        raise bad("database.name must be 1–63 characters of a-z, 0-9 and '_', not starting with a digit")
    if name in RESERVED_DB_NAMES:
        raise bad(f"database.name cannot be {name}: the server keeps that name for itself")
    env = d.get("env", "url")
    if env not in ("url", "vars"):
        raise bad('database.env must be "url" or "vars"')
    sanitize = d.get("sanitize", True)
    if sanitize is True:
        sanitize = "db/sanitize.sql"
    elif sanitize is False:
        sanitize = None
    elif not isinstance(sanitize, str) or not sanitize or sanitize.startswith("/") or ".." in sanitize.split("/"):
        raise bad("database.sanitize must be a path inside the repository")
    return {"engine": engine, "name": name, "env": env, "sanitize": sanitize}


def program(name):
    """An engine's program: on the PATH, in sbin, or in the newest PostgreSQL's bin."""
    dirs = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/sbin", "/usr/local/sbin"]
    try:
        versions = sorted(os.listdir("/usr/lib/postgresql"), reverse=True,
                          key=lambda v: [int(n) for n in re.findall(r"\d+", v)])
        dirs += [os.path.join("/usr/lib/postgresql", v, "bin") for v in versions]
    except OSError:
        pass
    for d in dirs:
        p = os.path.join(d, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def need(engine, name):
    """The program's path, installing the engine from the distribution once if it is missing."""
    p = program(name)
    if p is None and engine not in installing and os.geteuid() == 0 and program("apt-get"):
        installing.add(engine)
        log(f"installing {LABELS[engine]}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            run(["apt-get", "update", "-q"], "/", env=env, timeout=600)
            run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES[engine]], "/", env=env,
                timeout=900)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            raise Failed("restoring_db", f"installing {LABELS[engine]} failed: {e}")
        # the preview's server runs from its own data directory, not the package's
        subprocess.run(["systemctl", "disable", "--now", "postgresql" if engine == "postgres" else "mariadb"],
                       capture_output=True)
        p = program(name)
    if p is None:
        raise Failed("restoring_db", f"`{name}` is not installed on this machine (the preview's database needs it)")
    return p


def run_as(account, missing):
    """Popen arguments that drop root to `account` (none when not root); `missing` says
    why the account is needed, if it does not exist."""
    if os.geteuid() != 0:
        return {}
    try:
        pw = pwd.getpwnam(account)
    except KeyError:
        raise Failed("restoring_db", missing)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [], "cwd": "/"}


def as_postgres():
    """PostgreSQL refuses to run as root: its server runs as `postgres`, which owns the data."""
    return run_as("postgres", "running as root, PostgreSQL needs a `postgres` account to run as; none exists")


def chown_to_postgres(path, recursive=False):
    who = as_postgres()
    if not who:
        return
    paths = [path]
    if recursive:
        for top, dirs, files in os.walk(path):
            paths += [os.path.join(top, n) for n in dirs + files]
    for p in paths:
        os.lchown(p, who["user"], who["group"])


def db_run(cmd, phase, what, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, LC_ALL="C"), **kw)
    if out.returncode != 0:
        raise Failed(phase, f"{what} failed (exit {out.returncode}): {(out.stderr or out.stdout).strip()[-2000:]}")
    return out.stdout


def os_user():
    return pwd.getpwuid(os.geteuid()).pw_name


def db_socket():
    return os.path.join(DB, "mysqld.sock")


def db_init(db):
    """A fresh, empty data directory (whatever an earlier attempt left goes)."""
    drop_db()
    os.makedirs(DB)
    engine = db["engine"]
    f = {"engine": engine, "name": db["name"], "env": db["env"], "user": "app",
         "port": int(CFG.get("db_port") or DEFAULT_DB_PORTS[engine]),
         "password": secrets.token_hex(18), "admin_password": secrets.token_hex(18)}
    data = os.path.join(DB, "data")
    if engine == "postgres":
        chown_to_postgres(DB)
        pwfile = os.path.join(DB, "admin.pw")
        with open(os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as w:
            w.write(f["admin_password"])
        chown_to_postgres(pwfile)
        try:
            db_run([need(engine, "initdb"), "-D", data, "-U", ADMIN, "--auth=scram-sha-256", "-E", "UTF8",
                    "--no-instructions", f"--pwfile={pwfile}"], "restoring_db", "initdb", **as_postgres())
        finally:
            os.remove(pwfile)
    else:
        if len(db_socket()) > 100:
            raise Failed("restoring_db", f"the agent's root is too deep for a socket path: {ROOT}")
        cmd = [need(engine, "mariadb-install-db"), "--no-defaults", f"--datadir={data}",
               # the superuser answers only on the server's socket, to this account
               "--auth-root-authentication-method=socket", f"--auth-root-socket-user={os_user()}",
               "--skip-test-db"]
        db_run(cmd + (["--user=root"] if os.geteuid() == 0 else []), "restoring_db", "mariadb-install-db")
    write_db_file(f)
    return f


def db_admin(f, sql, phase="restoring_db"):
    """Runs SQL as the server's superuser."""
    if f["engine"] == "postgres":
        cmd = [need("postgres", "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
               "-U", ADMIN, "-d", "postgres", "-p", str(f["port"]), "-c", sql]
        env = dict(os.environ, PGPASSWORD=f["admin_password"], PGCONNECT_TIMEOUT="2", LC_ALL="C")
    else:
        cmd = [need("mariadb", "mariadb"), "--no-defaults", f"--socket={db_socket()}", "-u", os_user(), "--batch",
               "--skip-column-names", "--connect-timeout=2", "-e", sql]
        env = dict(os.environ, LC_ALL="C")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise Failed(phase, f"the database refused `{sql[:80]}`: {out.stderr.strip()[-2000:]}")
    return out.stdout


def db_start(f, phase):
    """Starts the server on its port (loopback only) and waits until it answers."""
    global db_server, dbf
    db_stop()
    data = os.path.join(DB, "data")
    logf = open(os.path.join(ROOT, "db.log"), "a")
    if f["engine"] == "postgres":
        # a disk restored from a snapshot may have lost the owner; PostgreSQL insists on it
        if as_postgres() and os.stat(data).st_uid != as_postgres()["user"]:
            chown_to_postgres(DB, recursive=True)
        os.chmod(data, 0o700)
        cmd = [need("postgres", "postgres"), "-D", data, "-c", "listen_addresses=127.0.0.1", "-c",
               f"port={f['port']}", "-c", "unix_socket_directories="]
        kw = as_postgres()
    else:
        cmd = [need("mariadb", "mariadbd"), "--no-defaults", f"--datadir={data}", f"--socket={db_socket()}",
               f"--port={f['port']}", f"--pid-file={os.path.join(DB, 'mysqld.pid')}", "--bind-address=127.0.0.1",
               "--skip-name-resolve", "--skip-log-bin"] + (["--user=root"] if os.geteuid() == 0 else [])
        kw = {}
    # in the agent's process group and cgroup: stopping the agent stops it
    db_server = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                 env=dict(os.environ, LC_ALL="C"), **kw)
    db_server.engine = f["engine"]
    deadline = time.monotonic() + 120
    while True:
        if db_server.poll() is not None:
            raise Failed(phase, f"the database server exited ({db_server.returncode}):\n"
                         + tail(os.path.join(ROOT, "db.log")))
        try:
            db_admin(f, "SELECT 1", phase)
            dbf = f
            return
        except Failed:
            if time.monotonic() >= deadline:
                db_stop()
                raise Failed(phase, "the database server did not answer within 120 s:\n"
                             + tail(os.path.join(ROOT, "db.log")))
        time.sleep(0.05)


def db_stop():
    """Stops the server cleanly (PostgreSQL's fast shutdown), killing it if it hangs;
    whether it was running and stopped cleanly."""
    global db_server
    s, db_server = db_server, None
    if s is None or s.poll() is not None:
        return False
    s.send_signal(signal.SIGINT if s.engine == "postgres" else signal.SIGTERM)
    try:
        return s.wait(timeout=600) == 0
    except subprocess.TimeoutExpired:
        s.kill()
        s.wait()
        return False


def db_create(f):
    user, pw, name = f["user"], f["password"], f["name"]
    if f["engine"] == "postgres":
        db_admin(f, f"CREATE ROLE \"{user}\" LOGIN PASSWORD '{pw}'")
        db_admin(f, f"CREATE DATABASE \"{name}\" OWNER \"{user}\"")
    else:
        db_admin(f, f"CREATE DATABASE `{name}`; CREATE USER '{user}'@'%' IDENTIFIED BY '{pw}'; "
                    f"GRANT ALL ON `{name}`.* TO '{user}'@'%'; FLUSH PRIVILEGES;")


def db_client(f):
    """The engine's client, as the app's user on its database, reading SQL from stdin."""
    if f["engine"] == "postgres":
        cmd = [need("postgres", "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction",
               "-h", "127.0.0.1", "-U", f["user"], "-d", f["name"], "-p", str(f["port"])]
        return cmd, dict(os.environ, PGPASSWORD=f["password"], LC_ALL="C")
    cmd = [need("mariadb", "mariadb"), "--no-defaults", "-h", "127.0.0.1", "--batch", f"--port={f['port']}",
           "-u", f["user"], f["name"]]
    return cmd, dict(os.environ, MYSQL_PWD=f["password"], LC_ALL="C")


class Counted:
    """A stream that counts the bytes read from it (the dump's compressed bytes)."""

    def __init__(self, raw):
        self.raw, self.n = raw, 0

    def read(self, size=-1):
        b = self.raw.read(size)
        self.n += len(b)
        return b


def progress(done, total):
    try:
        call("POST", "/v1/agent/progress", {"done": done, "total": total}, timeout=5)
    except OSError:
        pass  # the splash shows the last figure a little longer


def recipe_of(db):
    """What an image of this database is baked with: None when the sanitize file is
    missing, too big or not UTF-8 (the dump is imported, and the import says why)."""
    sanitize = None
    if db["sanitize"] is not None:
        try:
            with open(os.path.join(SRC, db["sanitize"]), "rb") as r:
                raw = r.read(MAX_SANITIZE + 1)
            if len(raw) > MAX_SANITIZE:
                return None
            sanitize = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            return None
    return {"engine": db["engine"], "name": db["name"], "sanitize": sanitize}


def image_on_disk():
    """The database image this machine was created with, if its disk holds one."""
    try:
        img = json.load(open(IMAGE_FILE))
        return img if isinstance(img, dict) and isinstance(img.get("id"), str) else None
    except (OSError, ValueError):
        return None


def ask_dump(recipe, image):
    """How the control plane says to make the database: (status, answer)."""
    status, answer = None, None
    for attempt in range(30):
        try:
            status, answer, _ = call("POST", "/v1/agent/dump", {"recipe": recipe, "image": image})
            if status < 500:
                break
        except OSError as e:
            log(f"asking for the dump failed: {e}")
        time.sleep(min(2 ** attempt * 0.1, 5))
    if status not in (200, 204):
        raise Failed("restoring_db", (answer or {}).get("error") or f"the control plane answered {status} for the dump")
    return status, answer


def db_import(f, dump, report_progress=True):
    """Streams a dump from its presigned URL into the database."""
    if dump["engine"] != f["engine"]:
        raise Failed("restoring_db", f"wakegate.toml says the database is {LABELS[f['engine']]}, and the dump "
                                     f"{dump['id']} is a {LABELS.get(dump['engine'], dump['engine'])} dump")
    try:
        resp = urllib.request.urlopen(dump["url"], timeout=60)
    except (urllib.error.URLError, OSError) as e:
        raise Failed("restoring_db", f"downloading the dump: {e}")
    total = int(resp.headers.get("Content-Length") or dump["size"])
    say = progress if report_progress else (lambda done, total: None)
    cmd, env = db_client(f)
    logf = open(os.path.join(ROOT, "import.log"), "a")
    client = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=logf)
    counted = Counted(resp)
    src = gzip.GzipFile(fileobj=counted) if dump["gzip"] else counted
    broken, last = None, 0.0
    try:
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                if counted.n != total:
                    # a body cut short ends like a whole one for plain SQL
                    raise EOFError(f"the download ended after {counted.n} of {total} bytes")
                break
            client.stdin.write(chunk)
            if time.monotonic() - last >= 0.5:
                last = time.monotonic()
                say(counted.n, total)
    except BrokenPipeError:
        pass  # the client stopped: its own error says why
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, http.client.HTTPException) as e:
        broken = e
        client.kill()  # never commit half a dump
    finally:
        resp.close()
        try:
            client.stdin.close()
        except BrokenPipeError:
            pass
    code = client.wait()
    say(counted.n, total)
    if broken is not None:
        raise Failed("restoring_db", f"reading the dump: {broken}")
    if code != 0:
        raise Failed("restoring_db", f"importing the dump failed (exit {code}):\n"
                     + tail(os.path.join(ROOT, "import.log")))


def unprivileged():
    """Who runs a client on SQL a branch wrote, on a machine other previews start from:
    nobody (the clients' shell escapes, psql's `\\!` and MariaDB's `system`, get no root)."""
    return run_as("nobody", "running as root, the builder needs a `nobody` account to run sanitize SQL as")


def db_sanitize(f, path, as_nobody=False):
    cmd, env = db_client(f)
    who = unprivileged() if as_nobody else {}
    with open(path, "rb") as sql, open(os.path.join(ROOT, "import.log"), "a") as logf:
        code = subprocess.run(cmd, env=env, stdin=sql, stdout=subprocess.DEVNULL, stderr=logf, **who).returncode
    if code != 0:
        raise Failed("restoring_db", f"the sanitize script failed (exit {code}):\n"
                     + tail(os.path.join(ROOT, "import.log")))


def write_private(path, obj):
    # credentials stay on this machine only, readable by root
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as w:
        json.dump(obj, w)


def write_db_file(f):
    write_private(DB_FILE, f)


def restore_db(db):
    """The preview's database, fresh: started from the database image on the disk when
    it fits, else a new server filled from its dump and sanitized."""
    report("/v1/agent/phase", {"phase": "restoring_db"})
    began = time.monotonic()
    recipe = recipe_of(db)
    have = image_on_disk()
    status, answer = ask_dump(recipe, have["id"] if have else None)
    if status == 200 and answer.get("use_image") and have is not None:
        db_from_image(db, have)
        made(recipe, answer["id"], have["id"], "snapshot", began)
        log(f"database started from the image {have['id']} on this disk")
        return
    # data another recipe or dump made is no use
    shutil.rmtree(IMAGE, ignore_errors=True)
    f = db_init(db)
    db_start(f, "restoring_db")
    db_create(f)
    if status == 204:
        log("the project has no dump: the database starts empty")
        return
    if db["sanitize"] is not None and not os.path.isfile(os.path.join(SRC, db["sanitize"])):
        raise Failed("restoring_db", f"{db['sanitize']} is not in the repository: add the SQL that sanitizes an "
                                     "imported dump, or set `sanitize = false` under [database] in wakegate.toml")
    db_import(f, answer)
    if db["sanitize"] is None:
        log("sanitize = false: the dump is used as it is")
    else:
        db_sanitize(f, os.path.join(SRC, db["sanitize"]))
    made(recipe, answer["id"], None, "import", began)
    log(f"database restored from {answer['id']}")


def made(recipe, dump, image, method, began):
    took = int((time.monotonic() - began) * 1000)
    if report("/v1/agent/db", {"recipe": recipe, "dump": dump, "image": image, "method": method,
                               "took_ms": took}) != 204:
        log("recording how the database was made failed")


def db_from_image(db, img):
    """The image's data directory becomes the preview's (a rename: the same disk), and
    its server starts with passwords of its own: the image's are every clone's."""
    drop_db()
    os.rename(IMAGE, DB)
    os.remove(os.path.join(DB, "image.json"))
    f = {"engine": img["engine"], "name": db["name"], "env": db["env"], "user": img["user"],
         "port": int(CFG.get("db_port") or DEFAULT_DB_PORTS[img["engine"]]),
         "password": img["password"], "admin_password": img.get("admin_password", "")}
    write_db_file(f)
    db_start(f, "restoring_db")
    password, admin = secrets.token_hex(18), secrets.token_hex(18)
    if f["engine"] == "postgres":
        db_admin(f, f"ALTER ROLE \"{f['user']}\" PASSWORD '{password}'")
        db_admin(f, f"ALTER ROLE \"{ADMIN}\" PASSWORD '{admin}'")
    else:
        # the superuser answers on the socket to this account only: it has no password
        db_admin(f, f"ALTER USER '{f['user']}'@'%' IDENTIFIED BY '{password}'; FLUSH PRIVILEGES;")
    f["password"], f["admin_password"] = password, admin
    write_db_file(f)


def engine_version(engine):
    prog = need(engine, "postgres" if engine == "postgres" else "mariadbd")
    return db_run([prog, "--version"], "restoring_db", "asking the engine's version").strip()[:200]


def disk_usage(path):
    total = 0
    for top, _, files in os.walk(path):
        for n in files:
            try:
                total += os.lstat(os.path.join(top, n)).st_blocks * 512
            except OSError:
                pass
    return total


def bake(order):
    """A builder's work: the image's data directory, whole and stopped cleanly, in
    db-image/ (the control plane snapshots the disk once this reports)."""
    r = order["recipe"]
    db = {"engine": r["engine"], "name": r["name"], "env": "url"}
    shutil.rmtree(IMAGE, ignore_errors=True)
    f = db_init(db)
    db_start(f, "restoring_db")
    db_create(f)
    db_import(f, order["dump"], report_progress=False)
    if r.get("sanitize") is not None:
        path = os.path.join(ROOT, "sanitize.sql")
        with open(path, "w") as w:
            w.write(r["sanitize"])
        db_sanitize(f, path, as_nobody=True)
        os.remove(path)
    version = engine_version(f["engine"])
    if not db_stop():
        raise Failed("restoring_db", "the database server did not stop cleanly:\n" + tail(os.path.join(ROOT, "db.log")))
    size = disk_usage(os.path.join(DB, "data"))
    img = {"id": order["image"], "engine": f["engine"], "name": f["name"], "user": f["user"],
           "password": f["password"], "admin_password": f["admin_password"], "version": version}
    write_private(os.path.join(DB, "image.json"), img)
    os.rename(DB, IMAGE)
    os.remove(DB_FILE)
    # the snapshot carries the data, not this machine's logs
    for name in ("db.log", "import.log"):
        try:
            os.remove(os.path.join(ROOT, name))
        except OSError:
            pass
    # on the disk before the control plane snapshots it
    os.sync()
    return size, version


def builder(order):
    log(f"baking the database image {order['image']}")
    try:
        size, version = bake(order)
        body = {"image": order["image"], "size": size, "version": version}
        log(f"baked {order['image']}: {size >> 20} MiB, {version}")
    except Failed as e:
        body = {"image": order["image"], "reason": e.reason}
        log(f"the bake failed: {e.reason}")
    except Exception as e:  # a bug or the machine (a full disk): said, not a restart loop
        body = {"image": order["image"], "reason": f"the builder failed: {e!r}"}
        log(f"the bake failed: {e!r}")
    db_stop()
    report("/v1/agent/baked", body)
    # the control plane shuts the machine down and snapshots it
    while True:
        time.sleep(3600)


def drop_db():
    """A branch without a database: whatever an earlier deploy left goes."""
    global dbf
    db_stop()
    dbf = None
    if os.path.exists(DB_FILE):
        os.remove(DB_FILE)
    shutil.rmtree(DB, ignore_errors=True)


def db_env(f):
    if f["env"] == "url":
        scheme = "postgres" if f["engine"] == "postgres" else "mysql"
        return {"DATABASE_URL": f"{scheme}://{f['user']}:{f['password']}@127.0.0.1:{f['port']}/{f['name']}"}
    return {"DB_HOST": "127.0.0.1", "DB_PORT": str(f["port"]), "DB_NAME": f["name"], "DB_USER": f["user"],
            "DB_PASSWORD": f["password"]}


# S3 takes at most this much in one PUT
MAX_PUT = 5 << 30


def db_dump_command(f):
    """The engine's dump program, as the app's user, writing SQL to stdout."""
    if f["engine"] == "postgres":
        cmd = [need("postgres", "pg_dump"), "--no-owner", "--no-privileges", "-h", "127.0.0.1", "-U", f["user"],
               "-p", str(f["port"]), f["name"]]
        return cmd, dict(os.environ, PGPASSWORD=f["password"], LC_ALL="C")
    cmd = [need("mariadb", "mariadb-dump"), "--no-defaults", "-h", "127.0.0.1", "--single-transaction",
           "--routines", "--triggers", f"--port={f['port']}", "-u", f["user"], f["name"]]
    return cmd, dict(os.environ, MYSQL_PWD=f["password"], LC_ALL="C")


db_lock = threading.Lock()


def db_alive():
    """Starts the database server again if it died (a crash must not take the preview's
    data offline for good); True when it runs."""
    with db_lock:
        if dbf is None or db_server is None or db_server.poll() is None:
            return db_server is not None and db_server.poll() is None
        log(f"the database server exited ({db_server.returncode}); starting it again")
        try:
            db_start(dbf, "start")
            return True
        except Failed as f:
            log(f"restarting the database server failed: {f.reason}")
            return False


def db_supervise():
    while True:
        time.sleep(1)
        try:
            db_alive()
        except Exception as e:  # the supervisor outlives any one failure
            log(f"supervising the database failed: {e!r}")


def dump_to(path, logpath):
    """The database through gzip into `path`; the dump program's exit code."""
    cmd, env = db_dump_command(dbf)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6) as gz, \
            open(logpath, "a") as logf:
        dump = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=logf)
        try:
            shutil.copyfileobj(dump.stdout, gz, 1 << 20)
        except BaseException:
            dump.kill()  # a full disk: the dump stops too
            dump.wait()
            raise
        return dump.wait()


def pull(order):
    """Dumps the database through gzip to the disk, PUTs it to the presigned URL, and
    reports how it went (`wakegate db pull`)."""
    path = os.path.join(ROOT, "pull.sql.gz")
    logpath = os.path.join(ROOT, "pull.log")
    try:
        if dbf is None:
            raise Failed("pull", "this preview has no database")
        code = dump_to(path, logpath)
        if code != 0 and db_server is not None and db_server.poll() is not None and db_alive():
            # the server died under the dump: once more, on the restarted server
            code = dump_to(path, logpath)
        if code != 0:
            raise Failed("pull", f"dumping the database failed (exit {code}):\n" + tail(logpath))
        size = os.path.getsize(path)
        if size > MAX_PUT:
            raise Failed("pull", f"the dump is {size >> 20} MiB gzipped; one upload takes at most 5 GiB")
        # a fresh URL: the one the order came with may have run out while dumping
        status, again, _ = call("GET", "/v1/agent/pull")
        if status != 200 or not again or again.get("key") != order["key"]:
            raise Failed("pull", "the pull was called off while the database was being dumped")
        with open(path, "rb") as body:
            req = urllib.request.Request(again["url"], data=body, method="PUT")
            req.add_header("Content-Length", str(size))
            req.add_header("Content-Type", "application/gzip")
            with urllib.request.urlopen(req, timeout=300):
                pass
        log(f"database pulled: {size} bytes")
        report("/v1/agent/pull", {"key": order["key"], "size": size})
    except Failed as f:
        report("/v1/agent/pull", {"key": order["key"], "reason": f.reason})
    except (OSError, urllib.error.URLError) as e:
        report("/v1/agent/pull", {"key": order["key"], "reason": f"uploading the dump: {e}"})
    except Exception as e:
        report("/v1/agent/pull", {"key": order["key"], "reason": f"the agent failed: {e!r}"})
    finally:
        if os.path.exists(path):
            os.remove(path)


def pull_loop():
    """While the app runs: asks for database dumps, and makes them."""
    while True:
        try:
            status, order, headers = call("GET", "/v1/agent/pull")
            if status == 200 and order:
                pull(order)
                continue
        except Exception as e:  # the loop outlives any one failure
            log(f"asking for dump orders failed: {e!r}")
            status, order, headers = None, None, None
        if status == 410:
            return
        try:
            wait = float(headers.get("Retry-After", "5")) if headers else 5.0
        except ValueError:
            wait = 5.0
        time.sleep(min(max(wait, 0.05), 60))


def start_db(m):
    """After a stop or a hibernation: the database restored earlier starts again."""
    if database(m) is None:
        return
    try:
        f = json.load(open(DB_FILE))
    except (OSError, ValueError):
        raise Failed("start", "the preview's database is missing from this machine's disk")
    db_start(f, "start")


def deploy(work):
    done = None
    try:
        done = json.load(open(MARKER))
    except (OSError, ValueError):
        pass
    if done == {"preview": work["preview"], "git_ref": work["git_ref"]}:
        m = manifest()
        start_db(m)
        return m
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
    # a deploy marker comes only after the database: one cut short starts over
    db = database(m)
    if db is None:
        drop_db()
    else:
        restore_db(db)
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
    db_stop()
    sys.exit(0)


def ship_logs():
    """Sends what build.log and app.log gained to the control plane every 2 s, so
    `wakegate logs` shows them. Where each stands is asked once, then kept."""
    at = {}
    while True:
        for stream in ("build", "app"):
            path = os.path.join(ROOT, stream + ".log")
            if not os.path.exists(path):
                continue
            try:
                size = os.path.getsize(path)
                if stream not in at:
                    status, body, _ = call("GET", f"/v1/agent/logs?stream={stream}")
                    if status != 200:
                        continue
                    at[stream] = body["shipped"]
                # until caught up (at most 64 chunks a round), 16 KiB a request
                for _ in range(64):
                    if size <= at[stream]:
                        break
                    with open(path, "rb") as f:
                        f.seek(at[stream])
                        chunk = f.read(16 * 1024)
                    status, body, _ = call("POST", f"/v1/agent/logs?stream={stream}&offset={at[stream]}", raw=chunk)
                    if status != 200 or body["shipped"] == at[stream]:
                        break
                    at[stream] = body["shipped"]
            except Exception as e:  # noqa: BLE001 - shipping logs must never stop
                log(f"shipping {stream}.log failed: {e!r}")
        time.sleep(2)


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
    if "bake" in work:
        builder(work["bake"])
    log(f"work: {work['preview']} at {work['git_ref']}")
    threading.Thread(target=ship_logs, daemon=True).start()
    try:
        m = deploy(work)
        start(m, work)
    except Failed as f:
        log(f"failed in {f.phase}: {f.reason}")
        report("/v1/agent/failed", {"phase": f.phase, "reason": f.reason})
        stop_app()
    except Exception as e:  # a bug or the machine (a full disk): said, not a restart loop
        log(f"failed in {phase_now}: {e!r}")
        report("/v1/agent/failed", {"phase": phase_now, "reason": f"the agent failed: {e!r}"})
        stop_app()
    report("/v1/agent/ready", {"port": PORT})
    log("ready")
    # asked for even without a database, so a pull is answered ("no database") at once
    threading.Thread(target=pull_loop, daemon=True).start()
    if dbf is not None:
        threading.Thread(target=db_supervise, daemon=True).start()
    code = app.wait()
    log(f"the app exited ({code})")
    # the control plane marks the preview failed (its page offers a retry) instead of
    # sending visitors to a dead port
    report("/v1/agent/exited", {"reason": f"the app exited ({code}) while running:\n"
                                          + tail(os.path.join(ROOT, "app.log"))})
    db_stop()
    sys.exit(1)


if __name__ == "__main__":
    main()
