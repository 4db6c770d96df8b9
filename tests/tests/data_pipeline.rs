//! The data pipeline through the `catapult` binary: an S3 server on 127.0.0.1 against
//! local files, resume in a new process, bounded memory, and a trained BPE tokenizer
//! used by a training run.

use catapult_tests::{
    catapult, corpus, run_ok, scratch, sequences, workspace, S3Server, KJV_PREPARE_ARGS,
};
use std::path::{Path, PathBuf};

fn tiny() -> PathBuf {
    workspace().join("recipes/tiny.yaml")
}

/// `catapult data stream` of the tiny recipe over `data_path`, `batches` batches.
fn stream(dir: &Path, data_path: &str, batches: u64, extra: &[&str]) -> std::process::Command {
    let mut cmd = catapult(dir);
    cmd.args(["data", "stream"])
        .arg(tiny())
        .args(["--set", &format!("data.path={data_path}")])
        .args(["--batches", &batches.to_string()])
        .args(extra);
    cmd
}

#[test]
fn s3_and_local_files_give_identical_batches() {
    let dir = scratch("s3-pipeline");
    let server = S3Server::start("s3-server");
    let text = corpus().parent().unwrap().join("kjv.txt");
    let url = format!("s3://{}/kjv", server.bucket);
    // The same preparation as scripts/prepare-corpus, written to the object store.
    let out = run_ok(
        server.credentials(
            catapult(&dir)
                .args(["data", "prepare"])
                .arg(&text)
                .args(["-o", &url, "--endpoint", &server.endpoint])
                .args(KJV_PREPARE_ARGS),
        ),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&url));
    let endpoint = format!("data.storage.endpoint={}", server.endpoint);
    for world in [1usize, 2] {
        for rank in 0..world {
            let (w, r) = (world.to_string(), rank.to_string());
            let rank_args = ["--world", w.as_str(), "--rank", r.as_str()];
            let local = dir.join(format!("local-{world}-{rank}.jsonl"));
            let remote = dir.join(format!("s3-{world}-{rank}.jsonl"));
            run_ok(
                stream(&dir, corpus().to_str().unwrap(), 30, &rank_args)
                    .arg("-o")
                    .arg(&local),
            );
            run_ok(
                server.credentials(
                    stream(&dir, &url, 30, &rank_args)
                        .args(["--set", &endpoint])
                        .arg("-o")
                        .arg(&remote),
                ),
            );
            let (a, b) = (sequences(&local), sequences(&remote));
            assert_eq!(a.len(), 30 * 16 / world);
            assert_eq!(
                a, b,
                "world {world} rank {rank}: S3 and local streams differ"
            );
        }
    }
    // A wrong secret is refused with an error naming the object, not retried forever.
    let out = stream(&dir, &url, 1, &["--set", &endpoint])
        .env("AWS_ACCESS_KEY_ID", S3Server::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", "wrong")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("s3://catapult/kjv"), "{err}");
}

#[test]
fn unreachable_endpoint_is_retried_then_named() {
    let dir = scratch("s3-unreachable");
    let out = stream(
        &dir,
        "s3://nowhere/data",
        1,
        &[
            "--set",
            "data.storage.endpoint=http://127.0.0.1:1",
            "--set",
            "data.storage.retries=2",
            "--set",
            "data.storage.backoff_ms=20",
        ],
    )
    .env("AWS_ACCESS_KEY_ID", "x")
    .env("AWS_SECRET_ACCESS_KEY", "y")
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("warning: ").count(), 2, "{err}");
    assert!(
        err.contains("s3://nowhere/data") && err.contains("after 3 attempts"),
        "{err}"
    );
}

#[test]
fn a_state_restored_in_a_new_process_continues_the_stream() {
    let dir = scratch("resume-process");
    let data = corpus().to_str().unwrap().to_string();
    let reference = dir.join("reference.jsonl");
    run_ok(stream(&dir, &data, 40, &[]).arg("-o").arg(&reference));
    let reference = sequences(&reference);
    for k in [1u64, 9, 26] {
        let state = dir.join(format!("state-{k}.json"));
        run_ok(stream(&dir, &data, k, &[]).arg("--save-state").arg(&state));
        let rest = dir.join(format!("rest-{k}.jsonl"));
        run_ok(
            stream(&dir, &data, 40 - k, &[])
                .arg("--resume")
                .arg(&state)
                .arg("-o")
                .arg(&rest),
        );
        let expected: Vec<_> = reference
            .iter()
            .filter(|s| s["batch"].as_u64().unwrap() >= k)
            .cloned()
            .collect();
        assert_eq!(sequences(&rest), expected, "resumed after {k} batches");
    }
}

#[test]
fn streaming_memory_stays_within_the_read_ahead_budget() {
    let dir = scratch("memory");
    // 20x the 1 MiB budget: the KJV text six times over (~26 MB), 256 KiB row groups.
    let text = std::fs::read_to_string(corpus().parent().unwrap().join("kjv.txt")).unwrap();
    let big = dir.join("big.txt");
    std::fs::write(&big, text.repeat(6)).unwrap();
    run_ok(catapult(&dir).args(["data", "prepare"]).arg(&big).args([
        "-o",
        "big",
        "--split",
        "paragraph",
        "--row-group-size",
        "256KB",
    ]));
    let summary = dir.join("summary.json");
    // One pass over the corpus: 26M byte tokens / (64 x 1024 per batch) ~ 400 batches.
    run_ok(
        stream(
            &dir,
            "big",
            420,
            &[
                "--set",
                "data.read_ahead_mb=1",
                "--set",
                "data.seq_len=1024",
                "--set",
                "train.global_batch_size=64",
                "--set",
                "data.streams=8",
                "--set",
                "data.shuffle_buffer=16",
            ],
        )
        .arg("--summary")
        .arg(&summary),
    );
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    let tokens = s["tokens"].as_u64().unwrap();
    assert!(
        tokens as usize >= text.len() * 6 * 95 / 100,
        "{tokens} tokens"
    );
    let growth =
        s["rss_anon_peak_bytes"].as_u64().unwrap() - s["rss_anon_baseline_bytes"].as_u64().unwrap();
    // Holding the corpus would take > 100 MB (text plus 4-byte ids). The bound is the
    // 1 MiB budget plus a constant: each stream's current row group (8 x ~1.3 MB), its
    // shuffle block (8 x 16 x 1025 ids x 4 bytes = 0.5 MB), the I/O runtime and parquet
    // decoding buffers. Measured: ~25 MiB.
    let budget = 1 << 20;
    let constant = 32 << 20;
    assert!(
        growth < budget + constant,
        "resident memory grew by {:.1} MiB",
        growth as f64 / (1 << 20) as f64
    );
}

#[test]
fn a_trained_bpe_tokenizer_drives_a_training_run() {
    let dir = scratch("bpe");
    let out = run_ok(
        catapult(&dir)
            .args(["data", "tokenizer", "train", "--vocab-size", "512"])
            .arg(corpus())
            .args(["-o", "tokenizer.json"]),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("512 ids"));
    // Pre-tokenized shards with that tokenizer.
    let text = corpus().parent().unwrap().join("kjv.txt");
    run_ok(
        catapult(&dir)
            .args(["data", "prepare"])
            .arg(&text)
            .args([
                "-o",
                "kjv-bpe",
                "--tokenizer",
                "tokenizer.json",
                "--drop-text",
            ])
            .args(KJV_PREPARE_ARGS),
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("kjv-bpe/dataset.json")).unwrap()).unwrap();
    let tokens = index["tokens"].as_u64().unwrap();
    assert!(
        tokens < 4_300_000 / 2,
        "BPE should compress the 4.3 MB corpus: {tokens} tokens"
    );
    let train = |vocab: &str| {
        catapult(&dir)
            .arg("train")
            .arg(tiny())
            .args([
                "--set",
                "data.path=kjv-bpe",
                "--set",
                "data.tokenizer=tokenizer.json",
            ])
            .args(["--set", &format!("model.vocab_size={vocab}")])
            .args(["--set", "parallel.expert=1"])
            .args(["--set", "train.steps=3", "--set", "train.warmup_steps=0"])
            .args([
                "--set",
                "data.mask_documents=true",
                "--set",
                "output.dir=run",
            ])
            .output()
            .unwrap()
    };
    let small = train("300");
    assert_eq!(small.status.code(), Some(2));
    let err = String::from_utf8_lossy(&small.stderr);
    assert!(
        err.contains("model.vocab_size") && err.contains("512"),
        "{err}"
    );
    let ok = train("512");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let lines = catapult_tests::metrics(&dir.join("run/metrics.jsonl"));
    let last = lines
        .iter()
        .rev()
        .find(|l| l.get("loss").is_some())
        .unwrap();
    assert_eq!(last["step"], 3);
    assert!(last["loss"].as_f64().unwrap().is_finite());
}
