//! `catapult bench reduction`: what the canonical reduction tree (`parallel.reduction:
//! tree`, the default) costs against summing micro-batches in place and the ranks in
//! rank order (`ranks`), in the same run: tokens/s and peak RSS per layout, as ratios;
//! and how far apart expert-parallel sizes end (EP 1, 2, 4 on 4 ranks, the same global
//! batch and micro-batches): the expert matmuls see the rows of different ranks grouped
//! differently, so their sums round differently, which no reduction order can undo.

use super::common::{create_dir, median, mpirun_train, spinner};
use crate::UsageError;
use serde_json::{json, Value};
use std::path::Path;

/// (ranks, micro-batch size): micro-batches per rank of 8, 4 and 1 (global batch 16).
const LAYOUTS: [(usize, usize); 3] = [(1, 2), (4, 1), (4, 4)];

/// The median of `key` over step lines.
fn med(lines: &[Value], key: &str) -> f64 {
    median(lines.iter().filter_map(|l| l[key].as_f64()).collect())
}

/// Tokens/s and peak RSS of one layout in one order, over `repeats` runs alternating
/// with the other order.
fn cost(
    recipe: &Path,
    (ranks, micro): (usize, usize),
    (steps, repeats): (usize, usize),
    dir: &Path,
) -> anyhow::Result<Value> {
    let mut measured = json!({});
    for order in ["tree", "ranks"] {
        measured[order] = json!({"tokens_per_s": [], "peak_rss_bytes": []});
    }
    for round in 0..repeats {
        for order in ["tree", "ranks"] {
            let out = dir.join(format!("cost-{ranks}x{micro}-{order}-{round}"));
            let sets = [
                "parallel.expert=1".to_string(),
                format!("train.micro_batch_size={micro}"),
                format!("parallel.reduction={order}"),
                "checkpoint.every=0".into(),
            ];
            let lines = mpirun_train(recipe, ranks, steps, &sets, &out)?;
            let m = &mut measured[order];
            m["tokens_per_s"]
                .as_array_mut()
                .expect("built above")
                .push(med(&lines, "tokens_per_s").into());
            m["peak_rss_bytes"]
                .as_array_mut()
                .expect("built above")
                .push(med(&lines, "memory_peak_rss_bytes").into());
        }
    }
    let best = |order: &str, key: &str| {
        median(
            measured[order][key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_f64)
                .collect(),
        )
    };
    let (tree, ranks_tps) = (best("tree", "tokens_per_s"), best("ranks", "tokens_per_s"));
    let (tree_rss, ranks_rss) = (
        best("tree", "peak_rss_bytes"),
        best("ranks", "peak_rss_bytes"),
    );
    Ok(json!({
        "ranks": ranks, "micro_batch_size": micro,
        "micro_batches_per_rank": 16 / ranks / micro,
        "tree_tokens_per_s": tree, "ranks_tokens_per_s": ranks_tps,
        "tokens_per_s_ratio": tree / ranks_tps,
        "tree_peak_rss_bytes": tree_rss, "ranks_peak_rss_bytes": ranks_rss,
        "peak_rss_ratio": tree_rss / ranks_rss,
        "runs": measured,
    }))
}

/// The final weights of a run's gathered checkpoint, by name.
fn weights(run: &Path) -> anyhow::Result<Vec<(String, tch::Tensor)>> {
    let mut w = tch::Tensor::read_safetensors(run.join("checkpoint/model.safetensors"))?;
    w.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(w)
}

/// EP 1, 2 and 4 on 4 ranks: the largest weight difference and the relative L2 distance
/// of every tensor against EP 1, and the final losses.
fn expert_sizes(recipe: &Path, steps: usize, dir: &Path) -> anyhow::Result<Value> {
    let mut runs = Vec::new();
    for ep in [1usize, 2, 4] {
        let out = dir.join(format!("ep{ep}"));
        let sets = [
            format!("parallel.expert={ep}"),
            "train.micro_batch_size=2".to_string(),
        ];
        let lines = mpirun_train(recipe, 4, steps, &sets, &out)?;
        let loss = lines
            .last()
            .and_then(|l| l["loss"].as_f64())
            .unwrap_or(f64::NAN);
        runs.push((ep, out, loss));
    }
    let base = weights(&runs[0].1)?;
    let mut out = Vec::new();
    for (ep, path, loss) in &runs {
        let w = weights(path)?;
        let (mut max_abs, mut diff2, mut norm2) = (0f64, 0f64, 0f64);
        for ((_, a), (_, b)) in base.iter().zip(&w) {
            let d = (a - b).abs();
            max_abs = max_abs.max(d.max().double_value(&[]));
            diff2 += d.square().sum(tch::Kind::Double).double_value(&[]);
            norm2 += a.square().sum(tch::Kind::Double).double_value(&[]);
        }
        out.push(json!({
            "expert_parallel": ep, "final_loss": loss,
            "loss_difference": loss - runs[0].2,
            "max_abs_weight_difference": max_abs,
            "relative_l2_difference": (diff2 / norm2).sqrt(),
            "bitwise_equal_to_ep1": diff2 == 0.0,
        }));
    }
    Ok(Value::Array(out))
}

pub(super) fn run(
    recipe: &Path,
    (steps, repeats): (usize, usize),
    dir: &Path,
) -> Result<(), crate::Failure> {
    if steps < 6 || repeats == 0 {
        return Err(UsageError::new("--steps: at least 6; --repeats: at least 1").into());
    }
    let r = crate::load_recipe(recipe, &Default::default())?;
    if r.train.global_batch_size != 16 {
        return Err(UsageError::new(format!(
            "{}: train.global_batch_size is {}; the layouts need 16",
            recipe.display(),
            r.train.global_batch_size
        ))
        .into());
    }
    create_dir(dir)?;
    let spin = spinner("reduction cost, tree against ranks");
    let mut costs = Vec::new();
    for layout in LAYOUTS {
        costs.push(cost(recipe, layout, (steps, repeats), dir)?);
    }
    spin.set_message("expert-parallel sizes 1, 2, 4");
    let eps = expert_sizes(recipe, steps, dir)?;
    spin.finish_and_clear();
    let results = json!({"recipe": recipe.display().to_string(), "steps": steps,
        "cost": costs, "expert_parallel": eps});
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&results)? + "\n",
    )?;
    println!("canonical tree against rank order (tokens/s and peak RSS ratios, same run):");
    for c in &costs {
        println!(
            "  {} rank(s), {} micro-batch(es) per rank: tokens/s {:.0} vs {:.0} ({:.3}x), peak RSS {:.3}x",
            c["ranks"], c["micro_batches_per_rank"],
            c["tree_tokens_per_s"].as_f64().unwrap_or(f64::NAN),
            c["ranks_tokens_per_s"].as_f64().unwrap_or(f64::NAN),
            c["tokens_per_s_ratio"].as_f64().unwrap_or(f64::NAN),
            c["peak_rss_ratio"].as_f64().unwrap_or(f64::NAN),
        );
    }
    println!("expert-parallel sizes on 4 ranks, {steps} steps, against EP 1:");
    for e in eps.as_array().into_iter().flatten() {
        println!(
            "  EP {}: loss {:+.3e}, max |weight difference| {:.3e}, relative L2 {:.3e}",
            e["expert_parallel"],
            e["loss_difference"].as_f64().unwrap_or(f64::NAN),
            e["max_abs_weight_difference"].as_f64().unwrap_or(f64::NAN),
            e["relative_l2_difference"].as_f64().unwrap_or(f64::NAN),
        );
    }
    println!("{}", dir.join("results.json").display());
    Ok(())
}
