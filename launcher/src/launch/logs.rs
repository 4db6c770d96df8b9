//! The ranks' log files under `<run>/logs` (`rank-R.log`, `mpirun.log`), opened on first
//! use and appended to line by line.

use std::io::Write;
use std::path::PathBuf;

/// Ranks' logs under `<run>/logs`, opened on first use.
pub(super) struct Logs {
    dir: PathBuf,
    files: std::collections::BTreeMap<String, std::fs::File>,
}

impl Logs {
    pub(super) fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            files: Default::default(),
        }
    }

    pub(super) fn write(&mut self, name: &str, line: &str) {
        if !self.files.contains_key(name) {
            let path = self.dir.join(format!("{name}.log"));
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
            {
                Ok(f) => {
                    self.files.insert(name.to_string(), f);
                }
                Err(e) => {
                    eprintln!("warning: {}: {e}", path.display());
                    return;
                }
            }
        }
        if let Some(f) = self.files.get_mut(name) {
            let _ = writeln!(f, "{line}");
        }
    }
}
