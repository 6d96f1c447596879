//! How `train` is stopped from outside: the first Ctrl-C (or a closed stdout, through
//! [`super::output::on_closed`]) sets the flag the run reads after each step, so that it ends
//! after its current step with a checkpoint; a second Ctrl-C ends the process at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Ctrl-C: the first asks the run to stop after its current step (with a checkpoint and the
/// adapter so far); a second ends the process at once.
pub(crate) fn on_ctrl_c() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let set = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            errln!("\nstopped at once (the last checkpoint on disk is intact)");
            exit_now(130);
        }
        errln!("\nCtrl-C: finishing this step, then writing a checkpoint and the adapter (Ctrl-C again stops at once)");
    });
    if let Err(e) = set {
        errln!("note: Ctrl-C will stop the run at once ({e})");
    }
    stop
}

/// Ends the process at once, from the Ctrl-C thread while the main thread may be inside the GPU
/// driver: exit handlers and the driver's teardown are skipped (running them then can crash the
/// process, which would end by a signal instead of 130). Every file on disk is whole already.
fn exit_now(code: i32) -> ! {
    #[cfg(unix)]
    // SAFETY: _exit only ends the process; it takes no pointers and runs no handlers.
    unsafe {
        libc::_exit(code)
    }
    #[cfg(not(unix))]
    std::process::exit(code)
}
