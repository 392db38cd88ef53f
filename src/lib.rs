//! coremq: a thread-per-core MQTT broker. See ARCHITECTURE.md for the module map.
//!
//! Layering, bottom to top: `protocol`, `topic` and `session` are pure code (no I/O, no clock reads);
//! `xcore` is the only thing two threads touch; `core` is one core's state and packet handling;
//! `io` is the socket interface with its io_uring and epoll backends; `server` glues a core to its
//! sockets; `main.rs` parses the command line and starts one thread per core.

pub mod alloc;
pub mod auth;
pub mod cli;
pub mod config;
pub mod core;
pub mod cpus;
pub mod io;
pub mod passwd;
pub mod persist;
pub mod protocol;
pub mod server;
pub mod session;
pub mod stats;
pub mod tls;
pub mod topic;
pub mod xcore;
