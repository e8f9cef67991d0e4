//! The control socket: the protocol, the server inside the daemon, and the client that
//! `litestreamd status`, the dashboard and tests use.

pub mod client;
pub mod peer;
pub mod protocol;
pub mod server;
