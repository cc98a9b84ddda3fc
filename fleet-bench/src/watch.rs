//! The bench's children, watched: a child that exits before the bench lets it go, or that
//! logs an error, ends the run at once with what it said, instead of leaving the bench to
//! wait out a deadline.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fleet_e2e::ChildGuard;

/// Lines of a child's log kept to explain its end.
const LAST_LINES: usize = 5;

/// The first failure of any watched child, shared by the readers of their logs.
#[derive(Clone, Default)]
pub struct Watch(Arc<Mutex<Option<String>>>);

/// A watched child: dropping it stops the process; [`Watched::retire`] first says that its
/// end is expected.
pub struct Watched {
    child: Option<ChildGuard>,
    retired: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Watched {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, ChildGuard::pid)
    }

    /// Stops the child and answers once all it logged has been read; its end is not a
    /// failure.
    pub fn retire(mut self) {
        self.retired.store(true, Ordering::SeqCst);
        drop(self.child.take());
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Watch {
    /// Starts `cmd` with its standard error read line by line: each line goes on to the
    /// bench's standard error; a line at ERROR level, or the end of the log while the child
    /// is not retired (it exited), is the run's failure.
    pub fn spawn(&self, name: &str, mut cmd: Command) -> Result<Watched, String> {
        let mut child = cmd
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {name}: {e}"))?;
        let stderr = child.stderr.take().expect("piped");
        let retired = Arc::new(AtomicBool::new(false));
        let (failure, gone, name) = (self.0.clone(), retired.clone(), name.to_string());
        let reader = std::thread::spawn(move || {
            let mut last: VecDeque<String> = VecDeque::new();
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[{name}] {line}");
                if is_error(&line) {
                    fail(&failure, format!("{name} logged an error: {line}"));
                }
                if last.len() == LAST_LINES {
                    last.pop_front();
                }
                last.push_back(line);
            }
            if !gone.load(Ordering::SeqCst) {
                let said: Vec<String> = last.into_iter().collect();
                let tail = if said.is_empty() {
                    "it logged nothing".to_string()
                } else {
                    format!("its last lines: {}", said.join(" | "))
                };
                fail(&failure, format!("{name} exited during the run; {tail}"));
            }
        });
        Ok(Watched {
            child: Some(ChildGuard(child)),
            retired,
            reader: Some(reader),
        })
    }

    /// The first failure of a child, if one failed.
    pub fn check(&self) -> Result<(), String> {
        match self.0.lock().map(|f| f.clone()) {
            Ok(Some(why)) => Err(why),
            _ => Ok(()),
        }
    }
}

fn fail(failure: &Mutex<Option<String>>, why: String) {
    if let Ok(mut f) = failure.lock()
        && f.is_none()
    {
        *f = Some(why);
    }
}

/// A log line at ERROR level, in the text format of both programs (`<time>  ERROR <target>:
/// ...`) or their JSON one (`"level":"ERROR"`).
fn is_error(line: &str) -> bool {
    line.split_whitespace().nth(1) == Some("ERROR") || line.contains("\"level\":\"ERROR\"")
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// Waits (10 s at most) until the watch reports a failure; answers it.
    fn failure(w: &Watch) -> String {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Err(why) = w.check() {
                return why;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no failure reported within 10 s");
    }

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]).stdout(Stdio::null());
        c
    }

    #[test]
    fn a_child_that_dies_ends_the_run_with_its_last_words() {
        let w = Watch::default();
        let _child = w
            .spawn(
                "spoke-agent",
                sh("echo 'accept failed: Too many open files (os error 24)' >&2; exit 1"),
            )
            .unwrap();
        let why = failure(&w);
        assert!(
            why.starts_with("spoke-agent exited during the run"),
            "{why}"
        );
        assert!(why.contains("Too many open files (os error 24)"), "{why}");
    }

    #[test]
    fn an_error_line_ends_the_run_while_the_child_lives() {
        let w = Watch::default();
        let _child = w
            .spawn(
                "fleet-hub",
                sh("echo '2026-12-05T05:00:00.000Z  WARN hub: slow' >&2; \
                    echo '2026-12-05T05:00:01.000Z ERROR hub::engine: pass failed: boom' >&2; \
                    sleep 30"),
            )
            .unwrap();
        let why = failure(&w);
        assert_eq!(
            why,
            "fleet-hub logged an error: 2026-12-05T05:00:01.000Z ERROR hub::engine: pass \
             failed: boom"
        );
    }

    #[test]
    fn a_retired_child_is_no_failure() {
        let w = Watch::default();
        let child = w.spawn("fleet-hub", sh("sleep 30")).unwrap();
        // Retiring waits until everything the child logged was read.
        child.retire();
        assert_eq!(w.check(), Ok(()));
    }

    #[test]
    fn only_error_lines_are_errors() {
        for (line, error) in [
            (
                "2026-12-05T05:00:01.000Z ERROR hub::engine: pass failed",
                true,
            ),
            ("2026-12-05T05:00:01.000Z  WARN hub::engine: slow", false),
            (
                "2026-12-05T05:00:01.000Z  INFO hub: an ERROR word in a message",
                false,
            ),
            (r#"{"timestamp":"t","level":"ERROR","fields":{}}"#, true),
            (r#"{"timestamp":"t","level":"WARN","fields":{}}"#, false),
        ] {
            assert_eq!(is_error(line), error, "{line}");
        }
    }
}
