//! `catapult bench ckpt`: sharded checkpoint save and verified load throughput against
//! torch.save/torch.load of the same tensors (measured in the same run); the same
//! checkpoint written and read by 4 writers at once (each rank's own files, as every
//! rank writes its part) against one writer doing it all (as rank 0 did when it
//! gathered everything); and the training loop's blocking time per asynchronous save.

use super::common::{create_dir, python_json, spinner, train_here, utf8};
use catapult_checkpoints::{
    Checkpoints, Dtype, HostTensor, ManifestHead, RankLayout, RankState, SaveRequest, World,
};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Seconds of each measurement.
struct Times {
    save_s: f64,
    load_s: f64,
    /// The same checkpoint as 4 ranks' files: one writer / reader, then 4 at once.
    alone: (f64, f64),
    parallel: (f64, f64),
    base_save: f64,
    base_load: f64,
    /// The same bytes written raw (one file, write_all, fsync): the disk's rate.
    raw_save: f64,
    /// Mean training step, and mean time the loop blocked per asynchronous save.
    step_s: f64,
    block_s: f64,
}

pub(super) fn run(
    gib: f64,
    recipe: &Path,
    python: &Path,
    dir: &Path,
) -> Result<(), crate::Failure> {
    let _ = std::fs::remove_dir_all(dir);
    create_dir(dir)?;
    let (tensors, count, total) = fill(gib);
    // Twice each (one writer, then 4), the best of each: the disk's write-back and
    // cache state favour neither.
    let (a1, p1) = writers(&tensors, dir)?;
    let (a2, p2) = writers(&tensors, dir)?;
    let best = |x: (f64, f64), y: (f64, f64)| (x.0.min(y.0), x.1.min(y.1));
    let (alone, parallel) = (best(a1, a2), best(p1, p2));
    let (save_s, load_s, shard, raw_save) = save_and_load(tensors, dir)?;
    let (base_save, base_load) = baseline(python, &shard, dir)?;
    let (step_s, block_s) = async_blocking(recipe, dir)?;
    let times = Times {
        save_s,
        load_s,
        alone,
        parallel,
        base_save,
        base_load,
        raw_save,
        step_s,
        block_s,
    };
    report(&times, count, total, recipe, dir)
}

/// 64 MiB fp32 tensors filled from a fixed generator, `gib` GiB in all; their count and
/// bytes.
fn fill(gib: f64) -> (Vec<HostTensor>, usize, f64) {
    let per = 64usize << 20;
    let count = ((gib * (1u64 << 30) as f64) as usize).div_ceil(per).max(1);
    let p = spinner(&format!("filling {count} x 64 MiB tensors"));
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let tensors: Vec<HostTensor> = (0..count)
        .map(|i| {
            let data: Vec<u8> = (0..per / 8)
                .flat_map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()
                })
                .collect();
            HostTensor {
                name: format!("model.layers.{i}.weight"),
                dtype: Dtype::F32,
                shape: vec![per / 4 / 4096, 4096],
                data: data.into(),
            }
        })
        .collect();
    let total = (count * per) as f64;
    p.finish_and_clear();
    (tensors, count, total)
}

/// Ranks that write the checkpoint at once.
const WRITERS: usize = 4;

/// The checkpoint of `tensors` split over `WRITERS` ranks (tensor i to rank i mod 4),
/// saved and loaded (verified, then every tensor read) by one writer doing every rank's
/// part, then by `WRITERS` threads at once, each its own rank's: (save, load) seconds
/// of each.
fn writers(tensors: &[HostTensor], dir: &Path) -> anyhow::Result<((f64, f64), (f64, f64))> {
    let ranks: Vec<RankState> = (0..WRITERS)
        .map(|r| RankState {
            rank: r,
            tensors: tensors.iter().skip(r).step_by(WRITERS).cloned().collect(),
            pieces: Default::default(),
            state: serde_json::json!({}),
        })
        .collect();
    let head = |step| ManifestHead {
        step,
        ..bench_head()
    };
    let p = spinner("one writer: every rank's files, then every tensor read back");
    let store = Checkpoints::open(utf8(&dir.join("ckpt-ranks"))?, &Default::default())?;
    let started = Instant::now();
    store.save(SaveRequest {
        head: head(1),
        ranks: ranks.clone(),
    })?;
    let alone_save = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let loaded = store.load(1, true)?;
    for name in loaded.names() {
        std::hint::black_box(loaded.whole(name)?);
    }
    let alone_load = started.elapsed().as_secs_f64();
    p.finish_and_clear();
    let p = spinner(&format!("{WRITERS} writers at once: each rank's own files"));
    let started = Instant::now();
    let files = std::thread::scope(|s| {
        let handles: Vec<_> = (ranks.iter())
            .map(|r| s.spawn(|| store.save_rank(&head(2), r)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a writer thread panicked"))
            .collect::<Result<Vec<_>, _>>()
    })?;
    store.commit(head(2), files.into_iter().flatten().collect())?;
    let parallel_save = started.elapsed().as_secs_f64();
    let started = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..WRITERS)
            .map(|r| {
                let store = &store;
                s.spawn(move || -> anyhow::Result<()> {
                    let agree = |p: Option<String>| p.map(|p| (r, p));
                    let reader = catapult_checkpoints::Reader {
                        verify: true,
                        rank: r,
                        world: WRITERS,
                        agree: &agree,
                    };
                    let loaded = store.load_as(2, &reader)?;
                    for t in tensors.iter().skip(r).step_by(WRITERS) {
                        std::hint::black_box(loaded.whole(&t.name)?);
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("a reader thread panicked"))
    })?;
    let parallel_load = started.elapsed().as_secs_f64();
    p.finish_and_clear();
    let _ = std::fs::remove_dir_all(dir.join("ckpt-ranks"));
    Ok(((alone_save, alone_load), (parallel_save, parallel_load)))
}

fn bench_head() -> ManifestHead {
    ManifestHead {
        step: 1,
        tokens: 0,
        recipe: serde_json::json!({"name": "bench"}),
        world: World {
            data_parallel: 1,
            expert_parallel: 1,
            ranks: vec![RankLayout {
                rank: 0,
                data_parallel_rank: 0,
                experts: [0, 0],
            }],
        },
        growth: None,
    }
}

/// The tensors' bytes written raw to one file (write_all per tensor, then fsync of the
/// file and its directory, as the checkpoint's local writes do); the seconds.
fn raw_write(tensors: &[HostTensor], dir: &Path) -> anyhow::Result<f64> {
    use std::io::Write;
    let path = dir.join("raw.bin");
    let started = Instant::now();
    let mut f = std::fs::File::create(&path)?;
    for t in tensors {
        f.write_all(&t.data)?;
    }
    f.sync_all()?;
    std::fs::File::open(dir)?.sync_all()?;
    let s = started.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    Ok(s)
}

/// catapult's save (serialize, BLAKE3, write, fsync) and verified load of `tensors` as
/// one rank's checkpoint; the seconds of each, the shard written, and the best of two raw
/// writes of the same bytes (one before the save, one after).
fn save_and_load(tensors: Vec<HostTensor>, dir: &Path) -> anyhow::Result<(f64, f64, PathBuf, f64)> {
    let raw_before = raw_write(&tensors, dir)?;
    let store = Checkpoints::open(utf8(&dir.join("ckpt"))?, &Default::default())?;
    let request = SaveRequest {
        head: bench_head(),
        ranks: vec![RankState {
            rank: 0,
            tensors,
            pieces: Default::default(),
            state: serde_json::json!({}),
        }],
    };
    let p = spinner("catapult: save (serialize, BLAKE3, write, fsync), then verified load");
    let started = Instant::now();
    store.save(request)?;
    let shard = dir.join("ckpt/step-00000001/rank-00000.safetensors");
    let save_s = started.elapsed().as_secs_f64();
    let raw_s = raw_before.min(raw_after(&store, dir)?);
    let started = Instant::now();
    let loaded = store.load(1, true)?;
    for name in loaded.names() {
        std::hint::black_box(loaded.whole(name)?);
    }
    let load_s = started.elapsed().as_secs_f64();
    drop(loaded);
    p.finish_and_clear();
    Ok((save_s, load_s, shard, raw_s))
}

/// A raw write of the bytes the checkpoint just saved (read back from its shard first).
fn raw_after(store: &Checkpoints, dir: &Path) -> anyhow::Result<f64> {
    let loaded = store.load(1, false)?;
    let tensors: Vec<HostTensor> = loaded
        .names()
        .map(|n| loaded.whole(n))
        .collect::<Result<_, _>>()?;
    raw_write(&tensors, dir)
}

/// torch.save / torch.load of the shard's tensors: (save seconds, load seconds).
fn baseline(python: &Path, shard: &Path, dir: &Path) -> anyhow::Result<(f64, f64)> {
    let p = spinner("baseline: torch.save / torch.load of the same tensors");
    let torch_file = dir.join("torch.pt");
    let base = python_json(
        python,
        "ckpt_baseline.py",
        &[shard.as_os_str(), torch_file.as_os_str()],
    )?;
    let (base_save, base_load) = (
        base["save_s"].as_f64().unwrap_or(f64::NAN),
        base["load_s"].as_f64().unwrap_or(f64::NAN),
    );
    p.finish_and_clear();
    Ok((base_save, base_load))
}

/// 40 steps of `recipe` with an asynchronous save every 10: the mean step and the mean
/// time the loop blocked per save, in seconds.
fn async_blocking(recipe: &Path, dir: &Path) -> anyhow::Result<(f64, f64)> {
    let p = spinner(&format!(
        "training {} for 40 steps, async save every 10",
        recipe.display()
    ));
    let sets = [
        "train.steps=40".to_string(),
        "train.warmup_steps=0".to_string(),
        "train.log_every=1".to_string(),
        "train.eval_sequences=8".to_string(),
        "checkpoint.every=10".to_string(),
        "parallel.expert=1".to_string(),
        format!("output.dir={}", dir.join("train-run").display()),
    ];
    let (r, lines) = train_here(recipe, &sets)?;
    let step_s: Vec<f64> = lines
        .iter()
        .filter_map(|v| {
            Some(
                r.train.global_batch_size as f64 * v["seq_len"].as_f64()?
                    / v["tokens_per_s"].as_f64()?,
            )
        })
        .collect();
    let block_s: Vec<f64> = lines
        .iter()
        .filter_map(|v| v["ckpt_block_s"].as_f64())
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    p.finish_and_clear();
    Ok((mean(&step_s), mean(&block_s)))
}

/// Prints the table and writes results.json.
fn report(
    t: &Times,
    count: usize,
    total: f64,
    recipe: &Path,
    dir: &Path,
) -> Result<(), crate::Failure> {
    let Times {
        save_s,
        load_s,
        alone,
        parallel,
        base_save,
        base_load,
        raw_save,
        step_s,
        block_s,
    } = *t;
    let gb = total / 1e9;
    println!(
        "checkpoint of {:.2} GB ({count} fp32 tensors), local disk {}",
        gb,
        dir.display()
    );
    println!(
        "{:<6} {:>14} {:>22} {:>7}",
        "", "catapult GB/s", "torch.save/load GB/s", "ratio"
    );
    println!(
        "{:<6} {:>14.2} {:>22.2} {:>7.2}",
        "save",
        gb / save_s,
        gb / base_save,
        base_save / save_s
    );
    println!(
        "{:<6} {:>14.2} {:>22.2} {:>7.2}",
        "load",
        gb / load_s,
        gb / base_load,
        base_load / load_s
    );
    println!(
        "raw write of the same bytes (write_all, fsync): {:.2} GB/s; catapult's save / raw: {:.2}",
        gb / raw_save,
        raw_save / save_s
    );
    println!(
        "(catapult's save includes BLAKE3 hashing and the manifest; its load verifies every hash)"
    );
    println!(
        "{:<6} {:>14} {:>22} {:>7}",
        "",
        "1 writer GB/s",
        format!("{WRITERS} writers at once GB/s"),
        "ratio"
    );
    for (what, one, many) in [("save", alone.0, parallel.0), ("load", alone.1, parallel.1)] {
        println!(
            "{what:<6} {:>14.2} {:>22.2} {:>7.2}",
            gb / one,
            gb / many,
            one / many
        );
    }
    println!(
        "(the same checkpoint as {WRITERS} ranks' files: one process writing and reading \
         every rank's part, as rank 0 did alone, against {WRITERS} at once, each its own rank's \
         part, on this host's {} cores and disk; across nodes each rank has its own)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "async save in training ({}): blocks {:.2} ms per save = {:.1}% of a {:.1} ms step",
        recipe.display(),
        block_s * 1e3,
        100.0 * block_s / step_s,
        step_s * 1e3
    );
    let report = serde_json::json!({
        "bytes": total, "save_gb_per_s": gb / save_s, "load_gb_per_s": gb / load_s,
        "torch_save_gb_per_s": gb / base_save, "torch_load_gb_per_s": gb / base_load,
        "raw_write_gb_per_s": gb / raw_save, "save_over_raw": raw_save / save_s,
        "save_over_torch": base_save / save_s, "load_over_torch": base_load / load_s,
        "async_block_s": block_s, "step_s": step_s,
        "one_writer_save_gb_per_s": gb / alone.0, "one_writer_load_gb_per_s": gb / alone.1,
        "parallel_writers": WRITERS,
        "parallel_save_gb_per_s": gb / parallel.0, "parallel_load_gb_per_s": gb / parallel.1,
    });
    let _ = std::fs::remove_dir_all(dir.join("ckpt"));
    let out = dir.join("results.json");
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!("results: {}", out.display());
    Ok(())
}
