"""A demo app with a database: it shows a row of the preview's own database.

It talks to PostgreSQL through `psql` ($DATABASE_URL) or to MariaDB through `mariadb`
($DB_HOST, $DB_PORT, $DB_NAME, $DB_USER, $DB_PASSWORD), so it needs no driver.
"""
import http.server
import os
import subprocess
import urllib.parse


def sql(query):
    if os.environ.get("DATABASE_URL", "").startswith("postgres"):
        cmd = ["psql", os.environ["DATABASE_URL"], "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", query]
        env = os.environ
    else:
        cmd = ["mariadb", "--no-defaults", "-h", os.environ["DB_HOST"], "-P", os.environ["DB_PORT"],
               "-u", os.environ["DB_USER"], "--batch", "--skip-column-names", os.environ["DB_NAME"], "-e", query]
        env = dict(os.environ, MYSQL_PWD=os.environ["DB_PASSWORD"])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=10)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip())
    return out.stdout.strip()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, code, text):
        body = text.encode()
        self.send_response(code)
        self.send_header("content-type", "text/plain; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        q = urllib.parse.parse_qs(url.query)
        try:
            if url.path == "/health":
                return self.answer(200, "ok")
            if url.path == "/":
                return self.answer(200, "message: " + sql("SELECT message FROM greeting ORDER BY id LIMIT 1"))
            if url.path == "/email":
                return self.answer(200, "email: " + sql("SELECT email FROM users ORDER BY id LIMIT 1"))
            if url.path == "/write":
                note = q.get("note", [""])[0].replace("'", "")
                sql(f"INSERT INTO notes (note) VALUES ('{note}')")
                return self.answer(200, "written")
            if url.path == "/notes":
                return self.answer(200, "notes: " + ",".join(sql("SELECT note FROM notes ORDER BY note").split()))
            return self.answer(404, "not found")
        except Exception as e:  # the page says what the database said
            return self.answer(500, f"database error: {e}")

    def log_message(self, *args):
        pass


port = int(os.environ.get("PORT", "8000"))
print(f"db demo app listening on {port}", flush=True)
http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
