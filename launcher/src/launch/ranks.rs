//! Where ranks run: the binary they execute and what this machine's mpirun must be told
//! (root, more ranks than cores), and the channel their output lines arrive on.

use std::path::PathBuf;
use std::sync::mpsc;

/// How this machine starts ranks: the binary they run, and what mpirun must be told.
pub(super) struct Ranks {
    pub(super) exe: PathBuf,
    /// Running as root (mpirun refuses it unless allowed).
    pub(super) root: bool,
    /// More ranks than cores need mpirun's --oversubscribe.
    pub(super) cores: usize,
}

impl Ranks {
    pub(super) fn here() -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        // SAFETY: getuid has no preconditions.
        let root = unsafe { libc::getuid() } == 0;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Self { exe, root, cores })
    }
}

/// The ranks' output lines, in arrival order: (written to stdout, the line).
pub(super) type Output = mpsc::Receiver<(bool, String)>;
