//! Helpers for the end-to-end tests: locate the built `catapult` binary (tests never
//! build it), prepare the built-in corpus once, and run commands in scratch directories.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// The release binary built by `cargo build --release` (scripts/test builds it first).
pub fn catapult_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let bin = target.join("release").join("catapult");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --release` (scripts/test does) before the tests",
        bin.display()
    );
    bin
}

/// A `catapult` command running in `dir`.
pub fn catapult(dir: &Path) -> Command {
    let mut cmd = Command::new(catapult_binary());
    cmd.current_dir(dir);
    cmd
}

/// Runs `cmd` and returns its output, failing the test with stderr when it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("catapult starts");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A fresh scratch directory under target/e2e/NAME.
pub fn scratch(name: &str) -> PathBuf {
    let dir = workspace().join("target").join("e2e").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// The built-in corpus (KJV parquet shards), prepared once per test process by
/// scripts/prepare-corpus.
pub fn corpus() -> &'static Path {
    static CORPUS: OnceLock<PathBuf> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let dir = workspace().join("target").join("test-data").join("kjv");
        let status = Command::new(workspace().join("scripts").join("prepare-corpus"))
            .arg(&dir)
            .status()
            .expect("scripts/prepare-corpus runs");
        assert!(status.success(), "scripts/prepare-corpus failed");
        dir
    })
}

/// Reads a JSON-lines metrics file.
pub fn metrics(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("each metrics line is JSON"))
        .collect()
}

/// BLAKE3 hash of a file's bytes, as hex.
pub fn file_hash(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    blake3::hash(&bytes).to_hex().to_string()
}

/// Whether an NVIDIA GPU is visible (tests that need one skip without it).
pub fn gpu_available() -> bool {
    Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
