//! The collectives' conformance checks (`catapult comm check`) in a single process and
//! under mpirun with 2 and 4 ranks (oversubscribed), with and without timing jitter:
//! every check passes on every rank, and the reductions give the same bits regardless
//! of message timing.

use catapult_tests::{catapult_binary, scratch};
use std::process::Command;

fn check(ranks: usize, jitter_ms: u64) -> Vec<serde_json::Value> {
    let dir = scratch(&format!("comm-{ranks}-{jitter_ms}"));
    let mut cmd = if ranks == 1 {
        Command::new(catapult_binary())
    } else {
        let mut c = Command::new("mpirun");
        c.args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            &ranks.to_string(),
        ])
        .arg(catapult_binary());
        c
    };
    let out = cmd
        .current_dir(&dir)
        .args(["comm", "check", "--jitter-ms", &jitter_ms.to_string()])
        .output()
        .expect("mpirun (Open MPI, installed by scripts/setup) starts");
    assert!(
        out.status.success(),
        "{ranks} ranks: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    lines.sort_by_key(|l| l["rank"].as_u64());
    assert_eq!(lines.len(), ranks);
    for (r, l) in lines.iter().enumerate() {
        assert_eq!(l["rank"], r);
        assert_eq!(l["size"], ranks);
        assert_eq!(l["backend"], if ranks == 1 { "single" } else { "mpi" });
        assert_eq!(l["failures"], serde_json::json!([]), "{l}");
    }
    lines
}

#[test]
fn collectives_conform_and_reductions_ignore_timing() {
    for ranks in [1, 2, 4] {
        let calm = check(ranks, 0);
        let shaken = check(ranks, 5);
        let digest = &calm[0]["digest"];
        assert!(
            calm.iter().chain(&shaken).all(|l| &l["digest"] == digest),
            "{ranks} ranks: {calm:?} {shaken:?}"
        );
    }
}
