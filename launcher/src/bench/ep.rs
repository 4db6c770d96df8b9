//! `catapult bench ep`: expert-parallel training (ranks started with mpirun) with Single
//! Batch Overlap on and off: step time, the share of all-to-all time hidden behind
//! compute, and the exchanged volume against the analytic one.

use super::common::{create_dir, median, mpirun_train, spinner};
use crate::UsageError;
use std::path::Path;

/// One expert-parallel training run under mpirun; its per-step metric lines after
/// warm-up.
fn ep_run(
    recipe: &Path,
    ranks: usize,
    steps: usize,
    overlap: bool,
    out: &Path,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let sets = [
        format!("parallel.expert={ranks}"),
        format!("parallel.overlap={overlap}"),
    ];
    mpirun_train(recipe, ranks, steps, &sets, out)
}

pub(super) fn run(
    recipe: &Path,
    ranks: usize,
    steps: usize,
    repeats: usize,
    dir: &Path,
) -> Result<(), crate::Failure> {
    if steps < 5 {
        return Err(
            UsageError::new(format!("--steps {steps}: use at least 5 (3 are warm-up)")).into(),
        );
    }
    create_dir(dir)?;
    let r = catapult_trainer::recipe::load(
        recipe,
        &[catapult_trainer::Override::parse(&format!(
            "parallel.expert={ranks}"
        ))?],
    )?;
    let mut lines: [Vec<serde_json::Value>; 2] = [Vec::new(), Vec::new()];
    for rep in 0..repeats {
        for (i, overlap) in [(0, true), (1, false)] {
            let p = spinner(&format!(
                "run {}/{repeats}: {ranks} ranks, {steps} steps, overlap {}",
                rep + 1,
                if overlap { "on" } else { "off" }
            ));
            let out = dir.join(format!("run-{}-{rep}", if overlap { "on" } else { "off" }));
            lines[i].extend(ep_run(recipe, ranks, steps, overlap, &out)?);
            p.finish_and_clear();
        }
    }
    let field = |i: usize, key: &str| -> f64 {
        median(lines[i].iter().filter_map(|l| l[key].as_f64()).collect())
    };
    let step = [field(0, "step_s"), field(1, "step_s")];
    let fwd = [
        field(0, "all_to_all_forward_exposed_s"),
        field(1, "all_to_all_forward_exposed_s"),
    ];
    let bwd = [
        field(0, "all_to_all_backward_exposed_s"),
        field(1, "all_to_all_backward_exposed_s"),
    ];
    let bytes = field(0, "all_to_all_bytes");
    let remote = field(0, "all_to_all_remote_bytes");
    let ffn_per_token = field(0, "ffn_experts_per_token");
    let m = &r.model;
    let tokens = (r.train.global_batch_size * r.data.seq_len) as f64;
    // Per layer and step: dispatch and combine forward, and their mirrors backward, each
    // carrying one fp32 row of `hidden` per routed selection.
    let per_selection = 4.0 * m.num_layers as f64 * m.hidden_size as f64 * 4.0;
    let analytic_k = tokens * m.moe_topk as f64 * per_selection;
    let analytic_ffn = tokens * ffn_per_token * per_selection;
    let hidden_fwd = 1.0 - fwd[0] / fwd[1];
    let hidden_all = 1.0 - (fwd[0] + bwd[0]) / (fwd[1] + bwd[1]);
    let results = serde_json::json!({
        "recipe": recipe.display().to_string(),
        "ranks": ranks,
        "steps_counted": lines[0].len(),
        "step_s": {"overlap_on": step[0], "overlap_off": step[1], "off_over_on": step[1] / step[0]},
        "forward_exposed_s": {"overlap_on": fwd[0], "overlap_off": fwd[1]},
        "backward_exposed_s": {"overlap_on": bwd[0], "overlap_off": bwd[1]},
        "hidden_fraction_forward": hidden_fwd,
        "hidden_fraction_all": hidden_all,
        "bytes_per_step": bytes,
        "remote_bytes_per_step": remote,
        "analytic_bytes_tokens_k_hidden": analytic_k,
        "analytic_bytes_ffn_selections": analytic_ffn,
        "ffn_experts_per_token": ffn_per_token,
    });
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&results).expect("a JSON value always serializes"),
    )?;
    println!(
        "expert-parallel step, {} on {ranks} ranks (medians over {} steps per setting)",
        recipe.display(),
        lines[0].len()
    );
    println!(
        "  step time       overlap on {:8.1} ms   off {:8.1} ms   off/on {:.3}",
        step[0] * 1e3,
        step[1] * 1e3,
        step[1] / step[0]
    );
    println!(
        "  exposed a2a     forward on {:6.2} ms off {:6.2} ms   backward on {:6.2} ms off {:6.2} ms",
        fwd[0] * 1e3,
        fwd[1] * 1e3,
        bwd[0] * 1e3,
        bwd[1] * 1e3
    );
    println!(
        "  hidden by overlap: {:.1}% of forward all-to-all time, {:.1}% of all of it",
        hidden_fwd * 100.0,
        hidden_all * 100.0
    );
    println!(
        "  volume per step {:.2} MB ({:.2} MB to other ranks); analytic tokens x K x hidden x 4 B x 4 x layers = {:.2} MB (ratio {:.3}); with the measured {:.3} FFN experts per token instead of K = {}: {:.2} MB (ratio {:.3})",
        bytes / 1e6,
        remote / 1e6,
        analytic_k / 1e6,
        bytes / analytic_k,
        ffn_per_token,
        m.moe_topk,
        analytic_ffn / 1e6,
        bytes / analytic_ffn
    );
    println!("results: {}", dir.join("results.json").display());
    Ok(())
}
