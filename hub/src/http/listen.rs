//! The hub's accept loop is the one both servers share (`fleet_server::listen`).
pub use fleet_server::listen::*;
