//! The agent's one error, by meaning. The HTTP API answers each kind with its `Status`
//! (`api.rs`), the command line with its exit code (`spoke-agent`'s `main`).
//!
//! A host step's failure is not one of these: it is the host's verdict to the engine
//! ([`crate::host::HostError`]: the stage fails, or it is tried again), recorded in the IBU's
//! conditions, never answered to a caller.

use crate::engine::Refusal;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// What was asked is wrong: a change the IBU's rules refuse (422, with their message),
    /// a command line that cannot work (exit 2).
    #[error("{0}")]
    Invalid(String),
    /// The agent cannot answer for now (rebooting, or a simulated outage): 503, try again.
    #[error("the agent is not reachable: {0}")]
    Unavailable(String),
    /// A fault of the agent or its node: saving the IBU failed, a port could not be opened.
    /// `what` is said to callers; `detail` goes to the log (and to the terminal at start).
    #[error("{what}: {detail}")]
    Internal { what: String, detail: String },
}

impl Error {
    pub fn internal(what: impl Into<String>, detail: impl ToString) -> Self {
        Error::Internal {
            what: what.into(),
            detail: detail.to_string(),
        }
    }
}

impl From<Refusal> for Error {
    fn from(r: Refusal) -> Self {
        Error::Invalid(r.0)
    }
}
