//! The streaming pipeline on real parquet shards written by `prepare`: world-size
//! invariance, exact resume, mixture proportions, phases, pre-tokenized data and bad
//! input. Everything runs in-process (the data crate has no libtorch); the end-to-end
//! versions through the `catapult` binary and an S3 server live in the tests crate.

use catapult_data::{
    prepare, Batch, DataState, DatasetSpec, DocumentSplit, Phase, Pipeline, PipelineConfig,
    PrepareOptions, ShardSize, StorageOptions,
};
use std::path::PathBuf;
use std::time::Duration;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("catapult-pipeline-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `docs` documents of varied length (30..400 bytes), each with a unique tag, as shards
/// of 40 documents in row groups of 7.
fn corpus(dir: &std::path::Path, name: &str, docs: usize, tokenizer: Option<&str>) -> String {
    let mut text = String::new();
    for i in 0..docs {
        let len = 30 + (i * 37) % 370;
        let body: String = (0..len)
            .map(|j| (b'a' + ((i * 7 + j * 3) % 26) as u8) as char)
            .collect();
        text.push_str(&format!("{name}{i}: {body}\n\n"));
    }
    let input = dir.join(format!("{name}.txt"));
    std::fs::write(&input, text).unwrap();
    let out = dir.join(name);
    let opts = PrepareOptions {
        split: DocumentSplit::Paragraph,
        shard_size: ShardSize::Documents(40),
        row_group_size: ShardSize::Documents(7),
        tokenizer: tokenizer.map(str::to_string),
        ..PrepareOptions::default()
    };
    prepare(&[input], out.to_str().unwrap(), &opts).unwrap();
    out.to_str().unwrap().to_string()
}

fn spec(name: &str, location: &str) -> DatasetSpec {
    DatasetSpec {
        name: name.into(),
        location: location.into(),
        text_column: "text".into(),
        tokens_column: None,
        verify: true,
    }
}

fn config(datasets: Vec<DatasetSpec>, weights: Vec<f64>) -> PipelineConfig {
    PipelineConfig {
        datasets,
        phases: vec![Phase {
            start_tokens: 0,
            weights,
            seq_len: 24,
        }],
        global_batch: 16,
        streams: 4,
        shuffle_buffer: 5,
        mixture_window: 20,
        workers: 2,
        read_ahead_bytes: 1 << 20,
        valid_fraction: 0.05,
        seed: 99,
        tokenizer: "bytes".into(),
        eod_token: None,
        storage: StorageOptions::default(),
    }
}

fn batches(cfg: &PipelineConfig, rank: usize, world: usize, n: usize) -> Vec<Batch> {
    let mut p = Pipeline::open(cfg.clone(), rank, world).unwrap();
    (0..n).map(|_| p.next_batch().unwrap()).collect()
}

#[test]
fn ranks_together_read_exactly_the_single_rank_stream() {
    let dir = scratch("world");
    let a = corpus(&dir, "a", 150, None);
    let b = corpus(&dir, "b", 90, None);
    let cfg = config(vec![spec("a", &a), spec("b", &b)], vec![0.6, 0.4]);
    // Enough batches to wrap both datasets' epochs several times.
    let n = 60;
    let one = batches(&cfg, 0, 1, n);
    for world in [1, 2, 4] {
        let per_rank: Vec<Vec<Batch>> = (0..world).map(|r| batches(&cfg, r, world, n)).collect();
        for (i, whole) in one.iter().enumerate() {
            let joined: Vec<Vec<u32>> = per_rank
                .iter()
                .flat_map(|rank| rank[i].sequences.clone())
                .collect();
            assert_eq!(joined, whole.sequences, "world {world}, batch {i}");
            assert_eq!(joined.len(), 16);
        }
    }
    // A different seed gives a different order of the same data.
    let mut other = cfg.clone();
    other.seed = 100;
    assert_ne!(batches(&other, 0, 1, 3)[0].sequences, one[0].sequences);
}

#[test]
fn a_restored_state_continues_the_exact_stream() {
    let dir = scratch("resume");
    let a = corpus(&dir, "a", 150, None);
    let b = corpus(&dir, "b", 90, None);
    let cfg = config(vec![spec("a", &a), spec("b", &b)], vec![0.7, 0.3]);
    let total = 40;
    let reference = batches(&cfg, 0, 1, total);
    let (mut mid_document, mut later_shard) = (false, false);
    for k in [1, 2, 5, 11, 23, 31] {
        let mut first = Pipeline::open(cfg.clone(), 0, 1).unwrap();
        for _ in 0..k {
            first.next_batch().unwrap();
        }
        let json = serde_json::to_string(&first.state()).unwrap();
        drop(first);
        let state: DataState = serde_json::from_str(&json).unwrap();
        for s in &state.streams {
            for d in &s.datasets {
                if let Some(block) = &d.block {
                    mid_document |= block.start.offset > 0;
                    later_shard |= block.start.shard != "shard-00000.parquet";
                }
            }
        }
        let mut resumed = Pipeline::open(cfg.clone(), 0, 1).unwrap();
        resumed.restore(&state).unwrap();
        for (i, expected) in reference.iter().enumerate().skip(k) {
            let got = resumed.next_batch().unwrap();
            assert_eq!(got, *expected, "resumed after {k} batches, batch {i}");
        }
    }
    assert!(
        mid_document && later_shard,
        "the cut points cover mid-document and later shards"
    );

    // A state saved by 4 ranks, merged, restores a 2-rank world exactly.
    let states: Vec<DataState> = (0..4)
        .map(|r| {
            let mut p = Pipeline::open(cfg.clone(), r, 4).unwrap();
            for _ in 0..7 {
                p.next_batch().unwrap();
            }
            p.state()
        })
        .collect();
    let merged = DataState::merge(&states).unwrap();
    for rank in 0..2 {
        let mut p = Pipeline::open(cfg.clone(), rank, 2).unwrap();
        p.restore(&merged).unwrap();
        let got = p.next_batch().unwrap();
        assert_eq!(
            got.sequences[..],
            reference[7].sequences[rank * 8..(rank + 1) * 8]
        );
    }
    // A state for another configuration is refused with a clear message.
    let mut changed = cfg.clone();
    changed.shuffle_buffer = 6;
    let mut p = Pipeline::open(changed, 0, 1).unwrap();
    let err = p.restore(&merged).unwrap_err().to_string();
    assert!(err.contains("different data configuration"), "{err}");
}

#[test]
fn mixture_proportions_hold_in_every_window() {
    let dir = scratch("mixture");
    let a = corpus(&dir, "a", 120, None);
    let b = corpus(&dir, "b", 120, None);
    let cfg = config(vec![spec("a", &a), spec("b", &b)], vec![0.7, 0.3]);
    // A stream's window of 20 sequences is 5 batches (4 sequences per stream per batch),
    // so every 5 global batches (80 sequences) hold each dataset's share.
    let all = batches(&cfg, 0, 1, 50);
    let per_window = 5;
    for (w, window) in all.chunks(per_window).enumerate() {
        let mut tokens = [0usize; 2];
        for batch in window {
            for &d in &batch.datasets {
                tokens[d as usize] += batch.seq_len;
            }
        }
        // Exactly 56 of 80 sequences (0.7), so within 1% a fortiori.
        assert_eq!(tokens[0] * 3, tokens[1] * 7, "window {w}: {tokens:?}");
        assert_eq!(tokens[0] + tokens[1], 80 * 24, "window {w}");
    }
    // The order within windows is shuffled, not a fixed pattern.
    let firsts: Vec<u16> = all.iter().map(|b| b.datasets[0]).collect();
    assert!(firsts.contains(&0) && firsts.contains(&1));
}

#[test]
fn phases_change_weights_and_sequence_length_at_their_token_counts() {
    let dir = scratch("phases");
    let a = corpus(&dir, "a", 120, None);
    let b = corpus(&dir, "b", 120, None);
    let mut cfg = config(vec![spec("a", &a), spec("b", &b)], vec![1.0, 0.0]);
    // 16 x 24 = 384 tokens per batch: phase 1 starts at batch ceil(2000 / 384) = 6.
    cfg.phases.push(Phase {
        start_tokens: 2000,
        weights: vec![0.0, 1.0],
        seq_len: 48,
    });
    let mut p = Pipeline::open(cfg, 0, 1).unwrap();
    for i in 0..10 {
        let batch = p.next_batch().unwrap();
        let (phase, len, dataset) = if i < 6 { (0, 24, 0) } else { (1, 48, 1) };
        assert_eq!((batch.phase, batch.seq_len), (phase, len), "batch {i}");
        assert!(batch.datasets.iter().all(|&d| d == dataset), "batch {i}");
        assert!(batch.sequences.iter().all(|s| s.len() == len + 1));
    }
}

#[test]
fn pretokenized_shards_give_the_same_stream_as_text() {
    let dir = scratch("pretok");
    let text = corpus(&dir, "same", 100, None);
    let plain = dir.join("plain");
    std::fs::rename(&text, &plain).unwrap();
    let tokens = corpus(&dir, "same", 100, Some("bytes"));
    let tok_cfg = config(vec![spec("d", &tokens)], vec![1.0]);
    let p = Pipeline::open(tok_cfg.clone(), 0, 1).unwrap();
    assert_eq!(
        p.datasets()[0].column,
        catapult_data::Column::Tokens("tokens".into())
    );
    drop(p);
    let from_text = batches(
        &config(vec![spec("d", plain.to_str().unwrap())], vec![1.0]),
        0,
        1,
        8,
    );
    assert_eq!(from_text, batches(&tok_cfg, 0, 1, 8));
}

#[test]
fn document_boundaries_follow_end_of_document_ids() {
    let dir = scratch("segments");
    let a = corpus(&dir, "a", 60, None);
    let batch = batches(&config(vec![spec("a", &a)], vec![1.0]), 0, 1, 1).remove(0);
    let segments = batch.segment_ids();
    for (i, seq) in batch.sequences.iter().enumerate() {
        let seg = &segments[i * batch.seq_len..(i + 1) * batch.seq_len];
        for p in 1..batch.seq_len {
            let expected = seg[p - 1] + u32::from(seq[p - 1] == batch.eod);
            assert_eq!(seg[p], expected);
        }
    }
    assert!(
        segments.iter().any(|&s| s > 0),
        "some sequence spans two documents"
    );
}

fn decode(seq: &[u32]) -> String {
    seq.iter()
        .map(|&t| if t < 128 { t as u8 as char } else { '|' })
        .collect()
}

/// Document tags `a17:` that appear whole (preceded by a non-alphanumeric or the start).
fn tags(text: &str) -> Vec<String> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    for i in 0..b.len() {
        if b[i] != b'a' || (i > 0 && b[i - 1].is_ascii_alphanumeric()) {
            continue;
        }
        let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits > 0 && b.get(i + 1 + digits) == Some(&b':') {
            out.push(text[i..i + 1 + digits].to_string());
        }
    }
    out
}

#[test]
fn validation_documents_never_reach_training() {
    let dir = scratch("heldout");
    let a = corpus(&dir, "a", 200, None);
    let mut cfg = config(vec![spec("a", &a)], vec![1.0]);
    cfg.valid_fraction = 0.2;
    let p = Pipeline::open(cfg.clone(), 0, 1).unwrap();
    let valid = p.validation(1000, 24).unwrap();
    drop(p);
    let held: Vec<String> = valid[0].1.iter().flat_map(|s| tags(&decode(s))).collect();
    assert!(held.len() > 10, "{held:?}");
    let trained: std::collections::BTreeSet<String> = batches(&cfg, 0, 1, 60)
        .iter()
        .flat_map(|b| b.sequences.iter())
        .flat_map(|s| tags(&decode(s)))
        .collect();
    assert!(trained.len() > 50, "{}", trained.len());
    for tag in &held {
        assert!(
            !trained.contains(tag),
            "held-out document {tag} was trained on"
        );
    }
}

#[test]
fn bad_input_names_the_file_and_the_fix() {
    let dir = scratch("bad");
    let a = corpus(&dir, "a", 30, None);
    let open = |cfg: PipelineConfig| {
        Pipeline::open(cfg, 0, 1)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };

    // Missing column.
    let mut s = spec("a", &a);
    s.text_column = "content".into();
    let err = open(config(vec![s], vec![1.0]));
    assert!(
        err.contains("no column `content`") && err.contains("dataset.json"),
        "{err}"
    );

    // Wrong column type: a directory of shards without an index whose column is a list.
    let tok = corpus(&dir, "tok", 30, Some("bytes"));
    std::fs::remove_file(PathBuf::from(&tok).join("dataset.json")).unwrap();
    let mut s = spec("t", &tok);
    s.text_column = "tokens".into();
    let err = open(config(vec![s], vec![1.0]));
    assert!(
        err.contains("column `tokens` has type List") && err.contains("shard-00000.parquet"),
        "{err}"
    );

    // Corrupt parquet file.
    let corrupt = dir.join("corrupt");
    std::fs::create_dir_all(&corrupt).unwrap();
    std::fs::write(
        corrupt.join("shard-00000.parquet"),
        b"PAR1 this is not parquet",
    )
    .unwrap();
    let err = open(config(
        vec![spec("c", corrupt.to_str().unwrap())],
        vec![1.0],
    ));
    assert!(
        err.contains("shard-00000.parquet") && err.contains("not a readable parquet file"),
        "{err}"
    );

    // Empty dataset.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = open(config(vec![spec("e", empty.to_str().unwrap())], vec![1.0]));
    assert!(err.contains("holds no *.parquet shards"), "{err}");

    // A glob that matches nothing.
    let err = open(config(
        vec![spec("g", &format!("{a}/nothing-*.parquet"))],
        vec![1.0],
    ));
    assert!(err.contains("nothing-*.parquet"), "{err}");

    // Unreachable endpoint: retried with backoff, then a clear error. (With credentials
    // set: without them the S3 client asks the instance metadata service first, and a
    // refusal there is not retried.)
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    let mut cfg = config(vec![spec("s3", "s3://bucket/prefix")], vec![1.0]);
    cfg.storage = StorageOptions {
        endpoint: Some("http://127.0.0.1:1".into()),
        region: None,
        retries: 2,
        backoff: Duration::from_millis(10),
    };
    let err = open(cfg);
    assert!(
        err.contains("s3://bucket/prefix") && err.contains("after 3 attempts"),
        "{err}"
    );
    assert!(err.contains("reachable"), "{err}");

    // Missing tokenizer.json.
    let mut cfg = config(vec![spec("a", &a)], vec![1.0]);
    cfg.tokenizer = dir.join("missing.json").to_str().unwrap().into();
    let err = open(cfg);
    assert!(
        err.contains("missing.json") && err.contains("tokenizer train"),
        "{err}"
    );

    // A world size that does not divide the streams.
    let err = Pipeline::open(config(vec![spec("a", &a)], vec![1.0]), 0, 3)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("multiple of the data-parallel size"), "{err}");
}

#[test]
fn globs_select_shards() {
    let dir = scratch("glob");
    let a = corpus(&dir, "a", 100, None);
    let all = Pipeline::open(config(vec![spec("a", &a)], vec![1.0]), 0, 1).unwrap();
    let n_all = all.datasets()[0].shards.len();
    drop(all);
    let some = Pipeline::open(
        config(
            vec![spec("a", &format!("{a}/shard-0000[01].parquet"))],
            vec![1.0],
        ),
        0,
        1,
    )
    .unwrap();
    assert_eq!(n_all, 3);
    let names: Vec<&str> = some.datasets()[0]
        .shards
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names, vec!["shard-00000.parquet", "shard-00001.parquet"]);
}

#[test]
fn a_shard_changed_after_indexing_fails_its_checksum_on_first_read() {
    let dir = scratch("checksum");
    let a = corpus(&dir, "a", 150, None);
    // One letter of document 46 (in the second shard), same size: the footer and row
    // counts still match, so only the checksum can tell.
    let shard = PathBuf::from(&a).join("shard-00001.parquet");
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = bytes
        .windows(5)
        .rposition(|w| w == b"a46: ")
        .expect("the text is stored verbatim")
        + 6;
    bytes[at] = if bytes[at] == b'z' { b'y' } else { b'z' };
    std::fs::write(&shard, bytes).unwrap();

    let mut unverified = spec("a", &a);
    unverified.verify = false;
    let quiet = config(vec![unverified], vec![1.0]);
    let mut p = Pipeline::open(quiet, 0, 1).unwrap();
    for _ in 0..20 {
        p.next_batch()
            .expect("without the check the change goes unnoticed");
    }

    let cfg = config(vec![spec("a", &a)], vec![1.0]);
    let mut p = Pipeline::open(cfg, 0, 1).unwrap();
    let err = (0..20)
        .find_map(|_| p.next_batch().err())
        .expect("the changed shard is refused")
        .to_string();
    assert!(
        err.contains("shard-00001.parquet")
            && err.contains("BLAKE3")
            && err.contains("dataset.json")
            && err.contains("catapult data prepare"),
        "{err}"
    );
}

#[test]
fn a_shard_that_does_not_decode_is_blamed_on_the_file_not_the_store() {
    let dir = scratch("undecodable");
    let a = corpus(&dir, "a", 150, None);
    // A byte inside a compressed page: the decoder notices.
    let shard = PathBuf::from(&a).join("shard-00001.parquet");
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = bytes.windows(5).position(|w| w == b"a46: ").unwrap() + 6;
    bytes[at] = if bytes[at] == b'z' { b'y' } else { b'z' };
    std::fs::write(&shard, bytes).unwrap();
    let mut unverified = spec("a", &a);
    unverified.verify = false;
    let mut p = Pipeline::open(config(vec![unverified], vec![1.0]), 0, 1).unwrap();
    let err = (0..20)
        .find_map(|_| p.next_batch().err())
        .expect("the damaged page is refused")
        .to_string();
    assert!(
        err.contains("shard-00001.parquet") && err.contains("damaged or not valid parquet"),
        "{err}"
    );
    assert!(!err.contains("credentials"), "{err}");
}
