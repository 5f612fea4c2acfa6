//! Build and app logs, shipped from the machines into the store so any waker can serve
//! them (`wakegate logs`), whichever host the provisioner and the machines are on.
//!
//! A preview's stream is one text that only grows (the newest [`MAX_LOG`] bytes are
//! kept). A shipper sends what its machine's log file gained since the offset the record
//! says it shipped; a new machine (a rebuild), or the file starting over, begins a new
//! section after a marker line. Offsets count bytes of the whole stream, so a reader
//! that follows asks for what came after the end it last saw.

use crate::{Store, StoreError};
use serde::{Deserialize, Serialize};

/// Most bytes of a stream kept.
pub const MAX_LOG: usize = 256 * 1024;
/// Most bytes one append takes (a shipper sends the rest next time).
pub const MAX_CHUNK: usize = 64 * 1024;

/// Which log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// Checkout, database restore and the project's build command.
    Build,
    /// The app's output while it runs.
    App,
}

impl Stream {
    pub const ALL: [Stream; 2] = [Stream::Build, Stream::App];

    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Build => "build",
            Stream::App => "app",
        }
    }

    /// The file a machine writes it to.
    pub fn file(self) -> &'static str {
        match self {
            Stream::Build => "build.log",
            Stream::App => "app.log",
        }
    }

    pub fn parse(s: &str) -> Option<Stream> {
        Stream::ALL.into_iter().find(|k| k.as_str() == s)
    }

    fn table(self) -> String {
        format!("logs:{}", self.as_str())
    }
}

/// A preview's stream as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Log {
    /// The stream offset of `text`'s first byte (earlier bytes were dropped).
    pub start: u64,
    pub text: String,
    /// The machine whose file is being shipped, and how much of that file is in.
    pub machine: String,
    pub shipped: u64,
}

impl Log {
    /// The stream offset after the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.text.len() as u64
    }
}

/// What a reader gets: the stream from `from` (or from the oldest byte kept).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slice {
    /// Where `text` begins; above the asked `from` when earlier bytes were dropped.
    pub start: u64,
    /// Where the stream ends now: ask from here to follow it.
    pub end: u64,
    pub text: String,
}

/// Adds what `machine`'s log file holds at `offset..` (`data`, at most [`MAX_CHUNK`]
/// bytes are taken). Returns the file offset the record has now: where the shipper
/// goes on from (ahead of or behind its own idea after a restart or a race).
pub async fn append(
    store: &dyn Store,
    preview: &str,
    stream: Stream,
    machine: &str,
    offset: u64,
    data: &[u8],
) -> crate::Result<u64> {
    let data = &data[..data.len().min(MAX_CHUNK)];
    // a character cut by the chunk's end waits for its other bytes
    let data = match std::str::from_utf8(data) {
        Err(e) if e.error_len().is_none() => &data[..e.valid_up_to()],
        _ => data,
    };
    let table = stream.table();
    for _ in 0..16 {
        let raw = store.table_get(&table, preview).await?;
        let mut log: Log = raw.as_deref().and_then(|r| serde_json::from_str(r).ok()).unwrap_or_default();
        // a retried chunk, or a shipper behind or ahead: told where the record is
        let restart = log.machine != machine;
        if !restart && offset != log.shipped {
            return Ok(log.shipped);
        }
        if restart {
            if offset != 0 {
                // a new file is shipped from its beginning
                return Ok(0);
            }
            if !log.text.is_empty() && !log.text.ends_with('\n') {
                log.text.push('\n');
            }
            if log.end() > 0 {
                log.text.push_str(&format!("--- {machine} ---\n"));
            }
            log.machine = machine.to_string();
            log.shipped = 0;
        }
        if data.is_empty() && !restart {
            return Ok(log.shipped);
        }
        log.text.push_str(&String::from_utf8_lossy(data));
        log.shipped += data.len() as u64;
        if log.text.len() > MAX_LOG {
            let mut cut = log.text.len() - MAX_LOG;
            while !log.text.is_char_boundary(cut) {
                cut += 1;
            }
            log.text.drain(..cut);
            log.start += cut as u64;
        }
        let next = serde_json::to_string(&log).map_err(|e| StoreError::Backend(e.to_string()))?;
        if store.table_swap(&table, preview, raw.as_deref(), Some(&next)).await? {
            return Ok(log.shipped);
        }
    }
    Err(StoreError::Conflict)
}

/// The stream from `from` on.
pub async fn read(store: &dyn Store, preview: &str, stream: Stream, from: u64) -> crate::Result<Slice> {
    let raw = store.table_get(&stream.table(), preview).await?;
    let log: Log = raw.as_deref().and_then(|r| serde_json::from_str(r).ok()).unwrap_or_default();
    let start = from.clamp(log.start, log.end());
    let mut at = (start - log.start) as usize;
    while !log.text.is_char_boundary(at) {
        at += 1;
    }
    Ok(Slice { start: log.start + at as u64, end: log.end(), text: log.text[at..].to_string() })
}

/// The machine whose logs a preview in `state` shows: the one building, running,
/// stopping, asleep or waking. A machine still serving during a redeploy, or one on
/// its way out, ships nothing.
pub fn current_machine(state: &wakegate_core::lifecycle::State) -> Option<&str> {
    use wakegate_core::lifecycle::State;
    match state {
        State::Building { machine: Some(m), .. }
        | State::Running { machine: m, .. }
        | State::Stopping { machine: m, .. }
        | State::Sleeping { machine: m }
        | State::Waking { machine: m } => Some(m.as_str()),
        _ => None,
    }
}

/// Where the record says `machine`'s file has been shipped to (0 for another machine).
pub async fn shipped(store: &dyn Store, preview: &str, stream: Stream, machine: &str) -> crate::Result<u64> {
    let raw = store.table_get(&stream.table(), preview).await?;
    let log: Log = raw.as_deref().and_then(|r| serde_json::from_str(r).ok()).unwrap_or_default();
    Ok(if log.machine == machine { log.shipped } else { 0 })
}

/// Drops a preview's logs (when it is erased).
pub async fn remove(store: &dyn Store, preview: &str) -> crate::Result<()> {
    for s in Stream::ALL {
        store.table_remove(&s.table(), preview).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EmbeddedStore;

    #[tokio::test]
    async fn a_stream_grows_restarts_per_machine_and_keeps_the_newest_bytes() {
        let dir = wakegate_testkit::tempdir("logs");
        let s = EmbeddedStore::open(&dir.join("s.log")).unwrap();
        assert_eq!(append(&s, "p", Stream::Build, "m1", 0, b"one\n").await.unwrap(), 4);
        assert_eq!(append(&s, "p", Stream::Build, "m1", 4, b"two\n").await.unwrap(), 8);
        // a shipper that is behind or ahead is told where the record is; nothing doubles
        assert_eq!(append(&s, "p", Stream::Build, "m1", 4, b"two\n").await.unwrap(), 8);
        assert_eq!(append(&s, "p", Stream::Build, "m1", 99, b"x").await.unwrap(), 8);
        let all = read(&s, "p", Stream::Build, 0).await.unwrap();
        assert_eq!((all.start, all.end, all.text.as_str()), (0, 8, "one\ntwo\n"));
        assert_eq!(read(&s, "p", Stream::Build, 4).await.unwrap().text, "two\n");
        assert_eq!(read(&s, "p", Stream::Build, 100).await.unwrap().text, "");
        // a retried first chunk does not start the stream over
        assert_eq!(append(&s, "p", Stream::Build, "m1", 0, b"one\n").await.unwrap(), 8);
        // a character cut at the chunk's end waits for its other bytes
        let mut cut = "é".as_bytes().to_vec();
        cut.truncate(1);
        assert_eq!(append(&s, "q", Stream::App, "m1", 0, &[b"ab".as_slice(), &cut].concat()).await.unwrap(), 2);
        assert_eq!(append(&s, "q", Stream::App, "m1", 2, "é!".as_bytes()).await.unwrap(), 5);
        assert_eq!(read(&s, "q", Stream::App, 0).await.unwrap().text, "abé!");
        // a rebuild on another machine starts a section
        assert_eq!(append(&s, "p", Stream::Build, "m2", 5, b"late").await.unwrap(), 0);
        assert_eq!(append(&s, "p", Stream::Build, "m2", 0, b"three").await.unwrap(), 5);
        assert_eq!(read(&s, "p", Stream::Build, 8).await.unwrap().text, "--- m2 ---\nthree");
        assert_eq!(shipped(&s, "p", Stream::Build, "m2").await.unwrap(), 5);
        assert_eq!(shipped(&s, "p", Stream::Build, "m1").await.unwrap(), 0);
        assert_eq!(read(&s, "p", Stream::App, 0).await.unwrap().end, 0, "streams are apart");
        // only the newest MAX_LOG bytes stay, cut at a character boundary
        let mut at = 5;
        let chunk = "é".repeat(MAX_CHUNK / 2);
        for _ in 0..6 {
            at = append(&s, "p", Stream::Build, "m2", at, chunk.as_bytes()).await.unwrap();
        }
        let tail = read(&s, "p", Stream::Build, 0).await.unwrap();
        assert!(tail.text.len() <= MAX_LOG && tail.text.len() > MAX_LOG - 4);
        assert_eq!(tail.end - tail.start, tail.text.len() as u64);
        assert!(tail.text.ends_with('é'));
        remove(&s, "p").await.unwrap();
        assert_eq!(read(&s, "p", Stream::Build, 0).await.unwrap().end, 0);
    }
}
