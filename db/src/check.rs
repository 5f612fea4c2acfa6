//! Checking a dump before it becomes anything's database: fed the bytes as they stream
//! (from S3, never held whole), it answers the SHA-256 and size of what was stored, and
//! whether the SQL inside is whole and for the project's engine.
//!
//! * gzip is recognised by its magic bytes (the file's name says nothing); a bad CRC,
//!   a bad length or a stream cut short is refused;
//! * the SQL is lexed, not parsed: quotes (`'…'`, `"…"`, MySQL's backticks and backslash
//!   escapes, PostgreSQL's `$tag$…$tag$` and `E'…'`), comments, MySQL `DELIMITER` lines,
//!   psql meta-commands (`\connect`) and PostgreSQL `COPY … FROM stdin` data blocks. A dump
//!   is whole when it ends outside all of them, after a statement's terminator, and
//!   (for dumps that say they come from pg_dump or mysqldump) with the tool's own
//!   "complete" trailer;
//! * another engine's dump (a mysqldump for a PostgreSQL project, a pg_dump for
//!   MariaDB), a pg_dump archive in custom format and binary data are refused by name.

use crate::Engine;
use sha2::{Digest, Sha256};
use std::io::Write;

/// What a whole, valid dump is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    /// Of the bytes as stored (compressed when they are).
    pub sha256: String,
    pub size: u64,
    pub gzip: bool,
    /// SQL bytes (after decompression).
    pub sql_bytes: u64,
    pub statements: u64,
}

/// Streams a dump through the checks: [`Checker::update`] with each chunk, then
/// [`Checker::finish`]. The first problem found is kept; later bytes are only hashed.
pub struct Checker {
    engine: Engine,
    hasher: Sha256,
    size: u64,
    /// The first bytes, until there are enough to tell gzip from plain SQL.
    head: Vec<u8>,
    inner: Option<Inner>,
    error: Option<String>,
}

enum Inner {
    Plain(Box<Lexer>),
    Gzip(Box<flate2::write::MultiGzDecoder<Lexer>>),
}

impl Inner {
    fn write(&mut self, data: &[u8]) -> Result<(), String> {
        match self {
            Inner::Plain(l) => l.feed(data),
            Inner::Gzip(d) => d.write_all(data).map_err(|e| lexer_or_gzip(d.get_ref(), &e)),
        }
    }
}

/// A write error from the decoder is the lexer's refusal, or bad gzip.
fn lexer_or_gzip(l: &Lexer, e: &std::io::Error) -> String {
    l.error.clone().unwrap_or_else(|| format!("the gzip data is corrupt ({e})"))
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

impl Checker {
    pub fn new(engine: Engine) -> Checker {
        Checker { engine, hasher: Sha256::new(), size: 0, head: Vec::with_capacity(2), inner: None, error: None }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.hasher.update(data);
        self.size += data.len() as u64;
        if self.error.is_some() {
            return;
        }
        if self.inner.is_none() {
            let take = (2 - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.head.len() < 2 {
                return;
            }
            let head = std::mem::take(&mut self.head);
            let lexer = Lexer::new(self.engine);
            let mut inner = if head == GZIP_MAGIC {
                Inner::Gzip(Box::new(flate2::write::MultiGzDecoder::new(lexer)))
            } else {
                Inner::Plain(Box::new(lexer))
            };
            if let Err(e) = inner.write(&head) {
                self.error = Some(e);
            }
            self.inner = Some(inner);
        }
        if let (Some(inner), None) = (self.inner.as_mut(), &self.error) {
            if let Err(e) = inner.write(data) {
                self.error = Some(e);
            }
        }
    }

    /// The verdict: the dump's figures, or why it is refused.
    pub fn finish(mut self) -> Result<Checked, String> {
        let sha256 = hex::encode(self.hasher.finalize());
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.inner.is_none() {
            if self.size == 0 {
                return Err("the dump is empty".into());
            }
            // one byte: plain SQL that cannot hold a statement
            let mut l = Lexer::new(self.engine);
            l.feed(&self.head)?;
            self.inner = Some(Inner::Plain(Box::new(l)));
        }
        let (lexer, gzip) = match self.inner.take().expect("set above") {
            Inner::Plain(l) => (*l, false),
            Inner::Gzip(mut d) => {
                if let Err(e) = d.try_finish() {
                    return Err(lexer_or_gzip(d.get_ref(), &e));
                }
                // a stream cut short ends without its trailer: the decoder is left
                // waiting for more and says nothing
                let l = d.finish().map_err(|e| format!("the gzip data is corrupt ({e})"))?;
                (l, true)
            }
        };
        if gzip && lexer.bytes == 0 && lexer.error.is_none() {
            return Err("the gzip data is cut short or holds nothing".into());
        }
        let (sql_bytes, statements) = lexer.end()?;
        Ok(Checked { sha256, size: self.size, gzip, sql_bytes, statements })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum St {
    Normal,
    /// Inside `'…'`; `backslash`: escapes are on (MySQL, or PostgreSQL `E'…'`).
    Single {
        backslash: bool,
    },
    Double,
    Backtick,
    LineComment,
    /// Nesting depth (PostgreSQL nests block comments).
    Block(u32),
    /// After a `$` that may open a dollar quote: the tag so far.
    DollarTag(Vec<u8>),
    /// Inside `$tag$…`: the closing `$tag$` and how much of it has matched.
    Dollar(Vec<u8>, usize),
    /// A `COPY … FROM stdin;` data block: lines until `\.`.
    Copy,
    /// A psql meta-command or a MySQL `DELIMITER` line, until its end.
    MetaLine,
}

/// The lexer (a `Write` sink for the decompressor).
struct Lexer {
    engine: Engine,
    st: St,
    /// A `\` (or the first byte of `''`) was seen inside a quote.
    escaped: bool,
    prev: u8,
    line: u64,
    bytes: u64,
    statements: u64,
    /// The current statement has significant text.
    in_stmt: bool,
    /// Its first significant bytes, lowercased (COPY, DELIMITER, meta-commands).
    stmt_head: Vec<u8>,
    /// Its last significant bytes, lowercased (`from stdin`).
    stmt_tail: Vec<u8>,
    delimiter: Vec<u8>,
    /// How much of the delimiter has matched (longer than one byte: `;;`).
    delim_match: usize,
    /// The current line, up to a bound (copy terminators, headers, trailers).
    line_buf: Vec<u8>,
    /// The dump says it comes from pg_dump / mysqldump: its trailer must be there.
    tool: Option<&'static str>,
    trailer_seen: bool,
    /// The first bytes (pg_dump's archive magic).
    magic: Vec<u8>,
    error: Option<String>,
}

const HEAD: usize = 64;
const TAIL: usize = 16;
const LINE: usize = 256;

impl Lexer {
    fn new(engine: Engine) -> Lexer {
        Lexer {
            engine,
            st: St::Normal,
            escaped: false,
            prev: b'\n',
            line: 1,
            bytes: 0,
            statements: 0,
            in_stmt: false,
            stmt_head: Vec::with_capacity(HEAD),
            stmt_tail: Vec::with_capacity(TAIL),
            delimiter: b";".to_vec(),
            delim_match: 0,
            line_buf: Vec::with_capacity(LINE),
            tool: None,
            trailer_seen: false,
            magic: Vec::with_capacity(5),
            error: None,
        }
    }

    fn fail(&mut self, why: String) -> Result<(), String> {
        let e = format!("line {}: {why}", self.line);
        self.error = Some(e.clone());
        Err(e)
    }

    fn feed(&mut self, data: &[u8]) -> Result<(), String> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        for &b in data {
            if self.magic.len() < 5 {
                self.magic.push(b);
                if self.magic == b"PGDMP" {
                    return self.fail(
                        "this is a pg_dump archive in custom format; push a plain SQL dump (pg_dump --format=plain)"
                            .into(),
                    );
                }
            }
            self.byte(b)?;
        }
        self.bytes += data.len() as u64;
        Ok(())
    }

    fn mysql(&self) -> bool {
        self.engine == Engine::Mariadb
    }

    fn significant(&mut self, b: u8) {
        self.in_stmt = true;
        let l = b.to_ascii_lowercase();
        if self.stmt_head.len() < HEAD {
            self.stmt_head.push(l);
        }
        if self.stmt_tail.len() == TAIL {
            self.stmt_tail.remove(0);
        }
        self.stmt_tail.push(l);
    }

    fn end_statement(&mut self) {
        self.statements += 1;
        let copy = self.engine == Engine::Postgres
            && self.stmt_head.starts_with(b"copy ")
            && self.stmt_tail.ends_with(b"from stdin");
        self.in_stmt = false;
        self.stmt_head.clear();
        self.stmt_tail.clear();
        self.delim_match = 0;
        if copy {
            // the data starts on the next line
            self.st = St::Copy;
            self.line_buf.clear();
            self.line_buf.push(b'\0');
        }
    }

    fn end_line(&mut self) -> Result<(), String> {
        let line = std::mem::take(&mut self.line_buf);
        self.check_line(&line)?;
        self.line_buf = line;
        self.line_buf.clear();
        self.line += 1;
        Ok(())
    }

    /// Headers, trailers and the other engine's marks, looked for on whole lines.
    fn check_line(&mut self, line: &[u8]) -> Result<(), String> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let pg = line.starts_with(b"-- PostgreSQL database dump");
        let my = line.starts_with(b"-- MySQL dump") || line.starts_with(b"-- MariaDB dump");
        if line == b"-- PostgreSQL database dump complete" || line.starts_with(b"-- Dump completed") {
            self.trailer_seen = true;
        } else if pg && self.tool.is_none() {
            self.tool = Some("pg_dump");
        } else if my && self.tool.is_none() {
            self.tool = Some("mysqldump");
        }
        match self.engine {
            Engine::Postgres if my || line.starts_with(b"/*!40") => self.fail(format!(
                "this is a MySQL/MariaDB dump (`{}`), and the project's database is PostgreSQL",
                excerpt(line)
            )),
            Engine::Mariadb if pg => self.fail(format!(
                "this is a PostgreSQL dump (`{}`), and the project's database is MariaDB",
                excerpt(line)
            )),
            _ => Ok(()),
        }
    }

    fn byte(&mut self, b: u8) -> Result<(), String> {
        if b == 0 {
            return self.fail("binary data (a NUL byte): this is not a SQL dump".into());
        }
        let was_line_start = self.prev == b'\n';
        if b != b'\n' && self.line_buf.len() < LINE {
            self.line_buf.push(b);
        }
        let prev = self.prev;
        self.prev = b;
        match std::mem::replace(&mut self.st, St::Normal) {
            St::Copy => {
                self.st = St::Copy;
                if b == b'\n' {
                    // line_buf starts with the marker pushed when the block began
                    let line = self.line_buf.strip_prefix(b"\0").unwrap_or(&self.line_buf);
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    if line == b"\\." {
                        self.st = St::Normal;
                    }
                    self.line_buf.clear();
                    self.line += 1;
                }
                return Ok(());
            }
            St::MetaLine => {
                if b == b'\n' {
                    let line = std::mem::take(&mut self.line_buf);
                    let text = String::from_utf8_lossy(&line);
                    let mut words = text.split_whitespace();
                    if words.next().is_some_and(|w| w.eq_ignore_ascii_case("delimiter")) {
                        match words.next() {
                            Some(d) if d.len() <= 8 => self.delimiter = d.as_bytes().to_vec(),
                            _ => {
                                return self.fail(format!("a DELIMITER line without a delimiter: `{}`", excerpt(&line)))
                            }
                        }
                    }
                    self.line_buf = line;
                    self.statements += 1;
                    self.in_stmt = false;
                    self.stmt_head.clear();
                    self.stmt_tail.clear();
                    self.end_line()?;
                } else {
                    self.st = St::MetaLine;
                }
                return Ok(());
            }
            St::LineComment => {
                if b == b'\n' {
                    self.end_line()?;
                } else {
                    self.st = St::LineComment;
                }
                return Ok(());
            }
            St::Block(depth) => {
                self.st = St::Block(depth);
                if prev == b'*' && b == b'/' && !self.escaped {
                    self.st = if depth > 1 { St::Block(depth - 1) } else { St::Normal };
                    self.prev = 0; // `*/*` does not open another
                } else if self.engine == Engine::Postgres && prev == b'/' && b == b'*' {
                    self.st = St::Block(depth + 1);
                    self.prev = 0;
                }
                if b == b'\n' {
                    self.end_line()?;
                }
                return Ok(());
            }
            St::Single { backslash } => {
                self.st = St::Single { backslash };
                if self.escaped {
                    self.escaped = false;
                } else if backslash && b == b'\\' {
                    self.escaped = true;
                } else if b == b'\'' {
                    self.st = St::Normal;
                }
                if b == b'\n' {
                    self.end_line()?;
                }
                self.significant(b);
                return Ok(());
            }
            St::Double => {
                self.st = if b == b'"' { St::Normal } else { St::Double };
                if b == b'\n' {
                    self.end_line()?;
                }
                self.significant(b);
                return Ok(());
            }
            St::Backtick => {
                self.st = if b == b'`' { St::Normal } else { St::Backtick };
                if b == b'\n' {
                    self.end_line()?;
                }
                self.significant(b);
                return Ok(());
            }
            St::DollarTag(mut tag) => {
                if b == b'$' {
                    let mut close = vec![b'$'];
                    close.extend_from_slice(&tag);
                    close.push(b'$');
                    self.st = St::Dollar(close, 0);
                    self.significant(b);
                    return Ok(());
                }
                if (b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80)
                    && tag.len() < 64
                    && !(tag.is_empty() && b.is_ascii_digit())
                {
                    tag.push(b);
                    self.st = St::DollarTag(tag);
                    self.significant(b);
                    return Ok(());
                }
                // `$1` or a lone `$`: not a quote; this byte is ordinary
            }
            St::Dollar(close, matched) => {
                let matched = if b == close[matched] {
                    matched + 1
                } else if b == b'$' {
                    1
                } else {
                    0
                };
                if b == b'\n' {
                    self.end_line()?;
                }
                self.significant(b);
                self.st = if matched == close.len() { St::Normal } else { St::Dollar(close, matched) };
                return Ok(());
            }
            St::Normal => {}
        }
        // Normal
        if b == b'\n' {
            self.delim_match = 0;
            return self.end_line();
        }
        if b.is_ascii_whitespace() {
            self.delim_match = 0;
            if self.mysql() && self.stmt_head == b"delimiter" {
                // the rest of the line sets the delimiter
                self.st = St::MetaLine;
            } else if self.in_stmt {
                self.significant(b' ');
            }
            return Ok(());
        }
        // a delimiter ends the statement (`;`, or what DELIMITER set)
        if b == self.delimiter[self.delim_match] {
            self.delim_match += 1;
            if self.delim_match == self.delimiter.len() {
                self.end_statement();
            }
            return Ok(());
        }
        if self.delim_match > 0 {
            // part of a longer delimiter that did not complete: ordinary text
            self.delim_match = 0;
        }
        let starts = !self.in_stmt;
        if starts && was_line_start {
            // psql meta-commands, mysql's DELIMITER
            if b == b'\\' && self.engine == Engine::Postgres {
                self.st = St::MetaLine;
                return Ok(());
            }
        }
        match b {
            b'-' if prev == b'-' && self.stmt_tail.last() == Some(&b'-') => {
                // `--`: the first `-` was counted as text; a comment needs no statement
                self.stmt_tail.pop();
                if self.stmt_head.len() == 1 && self.stmt_head[0] == b'-' {
                    self.stmt_head.clear();
                    self.in_stmt = false;
                }
                self.st = St::LineComment;
                return Ok(());
            }
            b'#' if self.mysql() => {
                self.st = St::LineComment;
                return Ok(());
            }
            b'*' if prev == b'/' && self.stmt_tail.last() == Some(&b'/') => {
                self.stmt_tail.pop();
                if self.stmt_head.len() == 1 && self.stmt_head[0] == b'/' {
                    self.stmt_head.clear();
                    self.in_stmt = false;
                }
                self.st = St::Block(1);
                self.prev = 0;
                return Ok(());
            }
            b'\'' => {
                // `E'…'`: the `e` is its own word (not the end of `table`)
                let t = &self.stmt_tail;
                let e_string = self.engine == Engine::Postgres
                    && (prev == b'e' || prev == b'E')
                    && (t.len() < 2 || !(t[t.len() - 2].is_ascii_alphanumeric() || t[t.len() - 2] == b'_'));
                self.st = St::Single { backslash: self.mysql() || e_string };
            }
            b'"' => self.st = St::Double,
            b'`' if self.mysql() => self.st = St::Backtick,
            b'$' if self.engine == Engine::Postgres && !(prev.is_ascii_alphanumeric() || prev == b'_') => {
                self.st = St::DollarTag(Vec::new())
            }
            _ => {}
        }
        self.significant(b);
        Ok(())
    }

    /// The verdict at the end: SQL bytes and statements, or why the dump is not whole.
    fn end(mut self) -> Result<(u64, u64), String> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if !self.line_buf.is_empty() && !matches!(self.st, St::Copy | St::MetaLine) {
            let line = std::mem::take(&mut self.line_buf);
            self.check_line(&line)?;
        }
        let cut = |what: &str| Err(format!("the dump ends inside {what}: it was cut short"));
        match &self.st {
            St::Normal | St::LineComment => {}
            St::MetaLine => self.statements += 1,
            St::Single { .. } | St::Double | St::Backtick | St::Dollar(..) => return cut("a quoted string"),
            St::Block(_) => return cut("a comment"),
            St::DollarTag(_) => {}
            St::Copy => return cut("a COPY data block (no `\\.` line)"),
        }
        if self.in_stmt {
            let head = String::from_utf8_lossy(&self.stmt_head).into_owned();
            return Err(format!("the dump ends in the middle of a statement (`{}…`): it was cut short", head.trim()));
        }
        if self.statements == 0 {
            return Err("the dump holds no SQL statements".into());
        }
        if let (Some(tool), false) = (self.tool, self.trailer_seen) {
            return Err(format!("the dump was made by {tool} but lacks its \"complete\" trailer: it was cut short"));
        }
        Ok((self.bytes, self.statements))
    }
}

impl Write for Lexer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.feed(buf).map_err(std::io::Error::other)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn excerpt(line: &[u8]) -> String {
    let s = String::from_utf8_lossy(&line[..line.len().min(60)]).into_owned();
    s.chars().filter(|c| !c.is_control()).collect()
}

/// Checks a whole dump in memory (tests, small files).
pub fn check(engine: Engine, data: &[u8]) -> Result<Checked, String> {
    let mut c = Checker::new(engine);
    c.update(data);
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    const PG: &str = "--\n-- PostgreSQL database dump\n--\n\nSET statement_timeout = 0;\n\\connect app\nCREATE TABLE public.t (id int, s text);\nCREATE FUNCTION f() RETURNS int AS $body$ select 1; $body$ LANGUAGE sql;\nCOPY public.t (id, s) FROM stdin;\n1\tit's; here\n2\t\\N\n\\.\n\nINSERT INTO t VALUES (3, E'a\\'; b');\n/* a /* nested */ comment; */\n--\n-- PostgreSQL database dump complete\n--\n\n";

    const MY: &str = "-- MariaDB dump 10.19  Distrib 10.11.6-MariaDB\n/*!40101 SET NAMES utf8mb4 */;\nCREATE TABLE `t` (`id` int, `s` text) ENGINE=InnoDB;\nINSERT INTO `t` VALUES (1,'it\\'s; here'),(2,'x');\nDELIMITER ;;\nCREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW BEGIN SET NEW.s = 'a;b'; END ;;\nDELIMITER ;\n# a comment; with a semicolon\n-- Dump completed on 2026-11-25 10:00:00\n";

    #[test]
    fn whole_dumps_pass_plain_and_gzipped() {
        let c = check(Engine::Postgres, PG.as_bytes()).unwrap();
        assert!(!c.gzip);
        assert_eq!(c.sql_bytes, PG.len() as u64);
        assert_eq!(c.statements, 6, "{c:?}");
        let c = check(Engine::Mariadb, MY.as_bytes()).unwrap();
        assert_eq!(c.statements, 6, "{c:?}");
        let z = gz(MY.as_bytes());
        let c = check(Engine::Mariadb, &z).unwrap();
        assert!(c.gzip);
        assert_eq!(c.size, z.len() as u64);
        assert_eq!(c.sha256, hex::encode(Sha256::digest(&z)));
        // hand-written SQL works for both engines
        check(Engine::Postgres, b"create table a (x int);\ninsert into a values (1);\n").unwrap();
        check(Engine::Mariadb, b"create table a (x int);\ninsert into a values (1);").unwrap();
    }

    #[test]
    fn any_chunking_gives_the_same_verdict() {
        for engine in [Engine::Postgres, Engine::Mariadb] {
            let text = if engine == Engine::Postgres { PG } else { MY };
            let z = gz(text.as_bytes());
            for data in [text.as_bytes(), &z[..]] {
                let whole = check(engine, data);
                for size in [1, 2, 3, 7, 64] {
                    let mut c = Checker::new(engine);
                    for chunk in data.chunks(size) {
                        c.update(chunk);
                    }
                    assert_eq!(c.finish(), whole, "chunks of {size}");
                }
            }
        }
    }

    #[test]
    fn cut_dumps_are_refused_wherever_they_were_cut() {
        for (engine, text) in [(Engine::Postgres, PG), (Engine::Mariadb, MY)] {
            // every cut that leaves something out of the last statement or the trailer
            let trailer = text
                .find(if engine == Engine::Postgres {
                    "-- PostgreSQL database dump complete"
                } else {
                    "-- Dump completed"
                })
                .unwrap();
            for cut in 1..trailer {
                let r = check(engine, &text.as_bytes()[..cut]);
                assert!(r.is_err(), "{engine:?} cut at {cut}: {:?}", &text[..cut]);
            }
        }
        let e = check(Engine::Postgres, b"create table a (x int);\ninsert into a values (1, 'ab").unwrap_err();
        assert!(e.contains("quoted string"), "{e}");
        let e = check(Engine::Postgres, b"create table a (x int);\ninsert into a values (1)").unwrap_err();
        assert!(e.contains("middle of a statement") && e.contains("insert into a"), "{e}");
        let e = check(Engine::Postgres, b"COPY t (a) FROM stdin;\n1\n2\n").unwrap_err();
        assert!(e.contains("COPY"), "{e}");
    }

    #[test]
    fn corrupt_gzip_is_refused() {
        let z = gz(MY.as_bytes());
        // a truncated stream
        let e = check(Engine::Mariadb, &z[..z.len() - 10]).unwrap_err();
        assert!(e.contains("gzip") || e.contains("cut short"), "{e}");
        // a bad CRC (the 8-byte trailer is CRC32 then length)
        let mut bad = z.clone();
        let n = bad.len();
        bad[n - 8] ^= 0xff;
        let e = check(Engine::Mariadb, &bad).unwrap_err();
        assert!(e.contains("gzip"), "{e}");
        // a flipped byte in the middle
        let mut bad = z.clone();
        bad[n / 2] ^= 0x55;
        assert!(check(Engine::Mariadb, &bad).is_err());
    }

    #[test]
    fn other_engines_and_non_sql_are_refused_by_name() {
        let e = check(Engine::Postgres, MY.as_bytes()).unwrap_err();
        assert!(e.contains("MySQL/MariaDB dump") && e.contains("PostgreSQL"), "{e}");
        let e = check(Engine::Mariadb, PG.as_bytes()).unwrap_err();
        assert!(e.contains("PostgreSQL dump"), "{e}");
        let e = check(Engine::Postgres, b"PGDMP\x01\x0e\x00\x04\x08\x01\x01").unwrap_err();
        assert!(e.contains("custom format"), "{e}");
        let e = check(Engine::Postgres, b"\x89PNG\r\n\x1a\n\x00\x00").unwrap_err();
        assert!(e.contains("not a SQL dump"), "{e}");
        assert!(check(Engine::Postgres, b"").unwrap_err().contains("empty"));
        assert!(check(Engine::Postgres, b"-- only a comment\n").unwrap_err().contains("no SQL"));
        assert!(check(Engine::Postgres, &gz(b"")).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512), split in 0usize..512) {
            for engine in [Engine::Postgres, Engine::Mariadb] {
                let mut c = Checker::new(engine);
                let split = split.min(data.len());
                c.update(&data[..split]);
                c.update(&data[split..]);
                let _ = c.finish();
                let _ = check(engine, &gz(&data));
            }
        }
    }
}
