//! `catapult bench scale`: a recipe on 4 ranks (started with mpirun), DP 4 and
//! DP 2 x EP 2, in every sharding mode built (`parallel.shard`), with and without
//! activation recomputation (`train.recompute`): the bytes rank 0 holds by category, its
//! peak RSS, the step time and the exposed parameter-gather and gradient-reduction
//! times, each as a ratio
//! against `shard: none` without recomputation on the same layout, measured in the same
//! run.

use super::common::{create_dir, median, mpirun_train, spinner};
use crate::UsageError;
use std::path::Path;

/// The (sharding, recomputation) settings measured, the baseline of each layout first.
const MODES: [(&str, &str); 8] = [
    ("none", "none"),
    ("optimizer", "none"),
    ("gradients", "none"),
    ("parameters", "none"),
    ("none", "layer"),
    ("optimizer", "layer"),
    ("gradients", "layer"),
    ("parameters", "layer"),
];

/// Medians of one setting's step lines after warm-up.
struct Row {
    layout: String,
    mode: (&'static str, &'static str),
    /// param, grad, optimizer bytes (rank 0), peak RSS, step s, gather s, reduce s.
    values: [f64; 7],
}

const KEYS: [&str; 7] = [
    "param_bytes",
    "grad_bytes",
    "optimizer_bytes",
    "memory_peak_rss_bytes",
    "step_s",
    "param_gather_exposed_s",
    "grad_reduce_exposed_s",
];

pub(super) fn run(
    recipe: &Path,
    (ranks, steps): (usize, usize),
    overrides: &[String],
    dir: &Path,
) -> Result<(), crate::Failure> {
    if steps < 5 {
        return Err(
            UsageError::new(format!("--steps {steps}: use at least 5 (3 are warm-up)")).into(),
        );
    }
    if ranks < 4 || !ranks.is_multiple_of(2) {
        return Err(UsageError::new(format!(
            "--ranks {ranks}: use an even number, at least 4 (DP {ranks} and DP {} x EP 2)",
            ranks / 2
        ))
        .into());
    }
    create_dir(dir)?;
    let mut rows = Vec::new();
    for expert in [1, 2] {
        let layout = format!("DP {} x EP {expert}", ranks / expert);
        for mode in MODES {
            let (shard, recompute) = mode;
            let p = spinner(&format!(
                "{layout}, shard {shard}, recompute {recompute}: {steps} steps"
            ));
            let mut sets = overrides.to_vec();
            sets.extend([
                format!("parallel.expert={expert}"),
                format!("parallel.shard={shard}"),
                format!("train.recompute={recompute}"),
                format!("train.micro_batch_size={}", 16 / ranks),
            ]);
            let out = dir.join(format!("ep{expert}-{shard}-{recompute}"));
            let lines = mpirun_train(recipe, ranks, steps, &sets, &out)?;
            p.finish_and_clear();
            let values = KEYS.map(|k| median(lines.iter().filter_map(|l| l[k].as_f64()).collect()));
            rows.push(Row {
                layout: layout.clone(),
                mode,
                values,
            });
        }
    }
    report(recipe, ranks, &rows, dir)
}

fn report(recipe: &Path, ranks: usize, rows: &[Row], dir: &Path) -> Result<(), crate::Failure> {
    println!(
        "sharded data parallelism, {} on {ranks} ranks (rank 0's medians after 3 warm-up steps; ratios against shard none without recomputation on the same layout)",
        recipe.display()
    );
    println!(
        "{:<14} {:<10} {:<9} {:>16} {:>16} {:>20} {:>16} {:>14} {:>10} {:>10}",
        "layout",
        "shard",
        "recompute",
        "params MiB",
        "grads MiB",
        "optimizer MiB",
        "peak RSS MiB",
        "step ms",
        "gather ms",
        "reduce ms"
    );
    let mib = |b: f64| b / (1u64 << 20) as f64;
    let mut results = Vec::new();
    for row in rows {
        let base = rows
            .iter()
            .find(|r| r.layout == row.layout && r.mode == MODES[0])
            .expect("none is measured first");
        let cell = |i: usize, scale: f64| {
            format!(
                "{:.2} ({:.2}x)",
                row.values[i] * scale,
                row.values[i] / base.values[i]
            )
        };
        println!(
            "{:<14} {:<10} {:<9} {:>16} {:>16} {:>20} {:>16} {:>14} {:>10.2} {:>10.2}",
            row.layout,
            row.mode.0,
            row.mode.1,
            cell(0, mib(1.0)),
            cell(1, mib(1.0)),
            cell(2, mib(1.0)),
            cell(3, mib(1.0)),
            cell(4, 1e3),
            row.values[5] * 1e3,
            row.values[6] * 1e3
        );
        let mut entry = serde_json::json!({
            "layout": row.layout,
            "shard": row.mode.0,
            "recompute": row.mode.1,
        });
        for (i, k) in KEYS.iter().enumerate() {
            entry[*k] = row.values[i].into();
            entry[format!("{k}_over_none")] = (row.values[i] / base.values[i]).into();
        }
        results.push(entry);
    }
    let out = dir.join("results.json");
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&serde_json::json!({
            "recipe": recipe.display().to_string(),
            "ranks": ranks,
            "results": results,
        }))
        .expect("a JSON value always serializes"),
    )?;
    println!("results: {}", out.display());
    Ok(())
}
