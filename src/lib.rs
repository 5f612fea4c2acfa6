//! The `wakegate` binary's library half: configuration and the composition root.
//!
//! * [`config`] — every setting, parsed once from an abstract source (the environment
//!   in production, a map in tests); a bad value is a [`config::ConfigError`] naming
//!   the key;
//! * [`cli`] — the operator's commands (`previews`, `projects`, `logs`) and where
//!   they find the waker and token (flags, environment, config file);
//! * [`backend`] — the configured machine backend (local or Hetzner) and its tasks;
//! * [`dev`] — edge, waker and provisioner in one process on the embedded store and
//!   the local backend, with a demo project (what `wakegate dev` runs, and what the
//!   end-to-end tests drive);
//! * [`metrics`] — `/metrics` on its own address, for every part;
//! * [`parts`] — the same pieces started one at a time against Redis.

pub mod backend;
pub mod cli;
pub mod config;
pub mod dbcli;
pub mod demo;
pub mod dev;
pub mod metrics;
pub mod operator;
pub mod parts;
