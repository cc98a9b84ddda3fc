//! SIGTERM and SIGINT (Ctrl-C), caught from the first moment of the process.
//!
//! A signal left to its default action kills the hub on the spot, and with it every chance to
//! stop the private Postgres it started. So `main` installs the handlers before anything
//! else, and each subcommand asks at its own safe points whether to stop: `serve` drains,
//! the demo drops what it runs; both then stop their database before they exit.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// The signal that asked the process to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Interrupt,
    Terminate,
}

impl Signal {
    /// The shell's convention for a process ended by this signal (128 + its number), for a
    /// command whose work the signal cut short.
    pub fn exit_code(self) -> u8 {
        match self {
            Signal::Interrupt => 128 + 2,
            Signal::Terminate => 128 + 15,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
        }
    }
}

/// A view of whether a stop was asked for; clones see the same signal.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<Option<Signal>>);

impl Shutdown {
    /// Installs the handlers for SIGTERM and SIGINT (must run inside the runtime). From then
    /// on neither signal kills the process: each only sets what [`Shutdown::requested`] says.
    pub fn install() -> std::io::Result<Shutdown> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            loop {
                let got = tokio::select! {
                    Some(()) = term.recv() => Signal::Terminate,
                    Some(()) = int.recv() => Signal::Interrupt,
                    else => return,
                };
                tracing::info!(signal = got.name(), "stopping");
                // The first signal is the one that counts; later ones are acknowledged only.
                tx.send_if_modified(|s| s.is_none() && s.replace(got).is_none());
            }
        });
        Ok(Shutdown(rx))
    }

    /// A handle stopped by hand: `send(Some(..))` asks for the stop.
    #[cfg(test)]
    pub fn manual() -> (watch::Sender<Option<Signal>>, Shutdown) {
        let (tx, rx) = watch::channel(None);
        (tx, Shutdown(rx))
    }

    /// The signal received so far, if any.
    pub fn requested(&self) -> Option<Signal> {
        *self.0.borrow()
    }

    /// Resolves with the first signal (at once when one came already). A handle whose sender
    /// is gone never resolves: nothing can ask for the stop any more.
    pub async fn wait(&self) -> Signal {
        let mut rx = self.0.clone();
        loop {
            if let Some(s) = *rx.borrow_and_update() {
                return s;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_resolves_with_the_first_signal_for_every_clone() {
        let (tx, shutdown) = Shutdown::manual();
        let other = shutdown.clone();
        assert_eq!(shutdown.requested(), None);
        let waiting = tokio::spawn(async move { other.wait().await });
        tx.send(Some(Signal::Terminate)).unwrap();
        assert_eq!(waiting.await.unwrap(), Signal::Terminate);
        assert_eq!(shutdown.requested(), Some(Signal::Terminate));
        assert_eq!(shutdown.wait().await, Signal::Terminate, "already asked");
        assert_eq!(Signal::Terminate.exit_code(), 143);
        assert_eq!(Signal::Interrupt.exit_code(), 130);
    }
}
