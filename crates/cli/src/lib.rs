//! The `chappe` command and the one place where Chappe's services are
//! composed.
//!
//! - [`platform`]: starts store, bus, keydir, fanout and gateway together in
//!   one process (what `chappe up` runs, and what the integration tests
//!   start);
//! - [`cli`]: the command line: `up`, and the client verbs a person uses
//!   (`login`, `create`, `conversations`, `send`, `listen`, `chat`,
//!   `history`, `send-file`, `download`, `presence`) on top of the client
//!   SDK.

pub mod cli;
pub mod platform;
