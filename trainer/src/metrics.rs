//! Where a run's numbers go: `metrics.jsonl` (one JSON object per line) and TensorBoard
//! event files under `tensorboard/` (the same numbers as tagged scalars), written by
//! rank 0; and the progress shown on stderr.

use crate::error::TrainError;
use crate::tensorboard::{scalars_of, EventWriter};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The metrics sinks of a run (all disabled on ranks other than 0).
pub(crate) struct Metrics {
    file: Option<std::fs::File>,
    pub(crate) path: PathBuf,
    tensorboard: Option<EventWriter>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn open_tensorboard(run_dir: &Path) -> Result<EventWriter, TrainError> {
    let dir = run_dir.join("tensorboard");
    EventWriter::create(&dir).map_err(io(&dir))
}

impl Metrics {
    /// Reopens a run's metrics for a resumed run: lines of steps after `step` (written
    /// before a crash, after the checkpoint) are dropped, later lines are appended. A new
    /// TensorBoard file continues the old ones (TensorBoard's reader purges an earlier
    /// file's steps past the point where a later file's steps restart).
    pub(crate) fn resume(
        path: PathBuf,
        step: u64,
    ) -> Result<(Self, Vec<serde_json::Value>), TrainError> {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io(&path)(e)),
        };
        let kept: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["step"].as_u64().is_some_and(|s| s <= step))
            .collect();
        let mut body = String::new();
        for v in &kept {
            body.push_str(&v.to_string());
            body.push('\n');
        }
        let tmp = path.with_extension("jsonl.tmp");
        std::fs::write(&tmp, body).map_err(io(&path))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        let tensorboard = open_tensorboard(path.parent().unwrap_or(Path::new(".")))?;
        Ok((
            Self {
                file: Some(file),
                path,
                tensorboard: Some(tensorboard),
            },
            kept,
        ))
    }

    /// A new `metrics.jsonl` at `path` and a TensorBoard directory beside it.
    pub(crate) fn create(path: PathBuf) -> Result<Self, TrainError> {
        let file = std::fs::File::create(&path).map_err(io(&path))?;
        let run_dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let tb_dir = run_dir.join("tensorboard");
        if tb_dir.exists() {
            // A fresh run (--overwrite) starts a fresh TensorBoard history.
            std::fs::remove_dir_all(&tb_dir).map_err(io(&tb_dir))?;
        }
        Ok(Self {
            file: Some(file),
            path,
            tensorboard: Some(open_tensorboard(&run_dir)?),
        })
    }

    /// Metrics of a rank other than 0: nothing is written.
    pub(crate) fn disabled() -> Self {
        Self {
            file: None,
            path: PathBuf::new(),
            tensorboard: None,
        }
    }

    /// Closes the files (an SDC rollback reopens them).
    pub(crate) fn close(&mut self) {
        self.file = None;
        self.tensorboard = None;
    }

    /// Appends one line to the JSON file and its numbers to TensorBoard.
    pub(crate) fn write(&mut self, value: serde_json::Value) -> Result<(), TrainError> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        writeln!(file, "{value}").map_err(io(&self.path))?;
        if let Some(tb) = self.tensorboard.as_mut() {
            let step = value["step"].as_u64().unwrap_or(0);
            tb.scalars(step, &scalars_of(&value))
                .map_err(io(&self.path.with_file_name("tensorboard")))?;
        }
        Ok(())
    }
}

/// Progress on stderr, from rank 0 only: a bar (steps, ETA, loss, tokens/s) on a
/// terminal; elsewhere (a log file, a pipe, a launcher) one plain line every
/// `every` steps and at the end, so logs hold no control characters. `CATAPULT_PROGRESS`
/// = `bar`, `lines` or `off` overrides the choice (the launcher sets `off`: it shows its
/// own bar from the metrics).
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    lines: bool,
    every: usize,
    total: usize,
    name: String,
    started: Instant,
    start_step: usize,
    lead: bool,
}

impl Progress {
    pub(crate) fn new(lead: bool, name: &str, total: usize, start: usize, every: usize) -> Self {
        let mode = std::env::var(crate::supervision::env::PROGRESS).unwrap_or_default();
        let terminal = std::io::stderr().is_terminal();
        let (bar, lines) = match (lead, mode.as_str()) {
            (false, _) | (true, "off") => (false, false),
            (true, "bar") => (true, false),
            (true, "lines") => (false, true),
            _ => (terminal, !terminal),
        };
        let bar = bar.then(|| {
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .expect("static template"),
            );
            b.set_prefix(name.to_string());
            b.set_position(start as u64);
            b
        });
        Self {
            bar,
            lines,
            every: every.max(1),
            total,
            name: name.to_string(),
            started: Instant::now(),
            start_step: start,
            lead,
        }
    }

    /// Step `done` finished with this summary message.
    pub(crate) fn step(&self, done: usize, message: &str) {
        if let Some(b) = &self.bar {
            b.set_message(message.to_string());
            b.set_position(done as u64);
        } else if self.lines && (done.is_multiple_of(self.every) || done == self.total) {
            let elapsed = self.started.elapsed().as_secs_f64();
            let per_step = elapsed / (done - self.start_step).max(1) as f64;
            let eta = per_step * (self.total - done) as f64;
            catapult_data::log_line!(
                "{} step {done}/{} | {message} | elapsed {} | eta {}",
                self.name,
                self.total,
                clock(elapsed),
                clock(eta)
            );
        }
    }

    /// Moves the position back (a rollback).
    pub(crate) fn set_position(&self, step: usize) {
        if let Some(b) = &self.bar {
            b.set_position(step as u64);
        }
    }

    /// A message line that does not break the bar.
    pub(crate) fn println(&self, line: String) {
        match &self.bar {
            Some(b) => b.println(line),
            None if self.lead => catapult_data::log_line!("{line}"),
            None => {}
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

/// `h:mm:ss`.
fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}
