//! Printing that never panics. `println!` panics when stdout is a closed pipe (`portalora train …
//! | head -2`), and `eprintln!` when stderr is; here a closed stdout ends the command quietly
//! instead: at once for a command that holds nothing unsaved (each prints only once its files are
//! written), and, for `train`, through the stop flag it registers ([`on_closed`]), after the
//! current step with a checkpoint — the run can be resumed — and then with no more output. The
//! process then exits with 141 (128 + SIGPIPE), what a shell reports for a program ended by a
//! closed pipe.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// The exit status of a command whose standard output was closed.
pub(crate) const CLOSED_STATUS: u8 = 141;

static CLOSED: AtomicBool = AtomicBool::new(false);
static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Whether standard output was found closed.
pub(crate) fn closed() -> bool {
    CLOSED.load(Ordering::SeqCst)
}

/// From now on a closed stdout sets `stop` (the run ends after its step) instead of ending the
/// process at once.
pub(crate) fn on_closed(stop: Arc<AtomicBool>) {
    let _ = STOP.set(stop);
}

/// Writes `args` and a newline to stdout; a write that fails (a closed pipe, a full disk behind a
/// redirect) marks stdout closed.
pub(crate) fn out(args: std::fmt::Arguments) {
    if closed() {
        return;
    }
    let mut o = std::io::stdout().lock();
    if writeln!(o, "{args}").and_then(|_| o.flush()).is_err() {
        drop(o);
        stdout_closed();
    }
}

/// Writes `args` and a newline to stderr; where stderr is closed there is nobody to tell.
pub(crate) fn err(args: std::fmt::Arguments) {
    let _ = writeln!(std::io::stderr().lock(), "{args}");
}

/// Stdout was found closed: train's run is asked to stop; any other command ends now.
pub(crate) fn stdout_closed() {
    CLOSED.store(true, Ordering::SeqCst);
    match STOP.get() {
        Some(stop) => stop.store(true, Ordering::SeqCst),
        None => std::process::exit(CLOSED_STATUS as i32),
    }
}

/// `println!` that never panics.
macro_rules! outln {
    ($($t:tt)*) => { $crate::output::out(format_args!($($t)*)) };
}

/// `eprintln!` that never panics.
macro_rules! errln {
    ($($t:tt)*) => { $crate::output::err(format_args!($($t)*)) };
}
