//! The launcher's own signals (SIGINT, SIGTERM, SIGUSR1): the handler records the last
//! one; the watcher takes it and decides (a first asks the ranks to checkpoint and stop,
//! a second stops them at once).

use std::sync::atomic::{AtomicI32, Ordering};

/// The last signal the launcher received (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
}

pub(super) fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1] {
        // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// The signal received since the last call (0: none), cleared.
pub(super) fn take() -> i32 {
    SIGNAL.swap(0, Ordering::SeqCst)
}
