//! Whole log lines on stderr: `log_line!` formats a line first and hands it to the
//! kernel in one write. Rust's stderr is unbuffered and `eprintln!` writes each piece of
//! its format separately; mpirun's `--tag-output` and srun's `--label` tag every write,
//! so a line written in pieces reaches the launcher and the rank logs with tags inside.

use std::io::Write;

/// Writes `line` (a whole line, newline included) to stderr in one write.
pub fn write_stderr(line: &str) {
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// `eprintln!`, in one write: `log_line!("step {step}: {msg}")`.
#[macro_export]
macro_rules! log_line {
    ($($arg:tt)*) => {{
        let mut line = format!($($arg)*);
        line.push('\n');
        $crate::line::write_stderr(&line);
    }};
}
