//! The experiments behind model growth and width transfer (run from the project root, on
//! the built-in corpus; each run is a `catapult train` process on one rank):
//!
//! - `catapult bench growth`: (a) the deep recipe from random init against (b) its
//!   half-depth model trained for half the tokens, stacked, and trained on, with the same
//!   total tokens; validation-loss curves and which ends lower.
//! - `catapult bench transfer`: a learning-rate grid on the width proxy, then the same
//!   grid at wider widths with `transfer.proxy` set; whether the proxy's best rate is
//!   within one grid step of the best at each target width.
//!
//! Results go to `results.json` and a PNG in the bench directory.

use crate::plot::{line_chart, palette, Curve};
use anyhow::{bail, Context};
use std::path::Path;
use std::process::Command;

/// (step, validation loss) of a metrics file, in order.
fn val_curve(metrics: &Path) -> anyhow::Result<Vec<(f64, f64)>> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("{}: no metrics", metrics.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_f64()?, v.get("val_loss")?.as_f64()?)))
        .collect())
}

/// One `catapult train RECIPE --overwrite --set ...` to completion; its wall time.
fn train(recipe: &Path, sets: &[String], label: &str) -> anyhow::Result<f64> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("train").arg(recipe).arg("--overwrite");
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.env("CATAPULT_PROGRESS", "off");
    eprintln!("bench: {label}");
    let started = std::time::Instant::now();
    let out = cmd.output().context("catapult starts")?;
    if !out.status.success() {
        bail!(
            "{label} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Settings every experiment run shares: one process on both cores, regular validation.
fn common(dir: &Path, steps: usize, eval_every: usize) -> Vec<String> {
    vec![
        format!("output.dir={}", dir.display()),
        format!("train.steps={steps}"),
        format!("train.eval_every={eval_every}"),
        "train.eval_sequences=64".into(),
        "train.log_every=10".into(),
        "parallel.expert=1".into(),
        "system.threads=2".into(),
        "checkpoint.every=0".into(),
    ]
}

/// (a) random init against (b) grown, same total tokens.
pub fn growth(
    recipe: &Path,
    steps: usize,
    eval_every: usize,
    dir: &Path,
) -> Result<(), crate::Failure> {
    let r = crate::load_recipe(recipe, &Default::default())?;
    let g = r
        .growth
        .clone()
        .with_context(|| format!("{}: has no growth section", recipe.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let per_step = (r.train.global_batch_size * r.data.seq_len) as u64;
    let grow_step = steps / 2;
    let until = grow_step as u64 * per_step;
    let mut a = common(&dir.join("random"), steps, eval_every);
    a.push("growth=null".into());
    let random_s = train(
        recipe,
        &a,
        &format!(
            "(a) {} layers from random init, {steps} steps",
            r.model.num_layers
        ),
    )?;
    let mut b = common(&dir.join("grown"), steps, eval_every);
    b.push(format!("growth.until_tokens={until}"));
    let grown_s = train(
        recipe,
        &b,
        &format!(
            "(b) {} layers for {grow_step} steps, stacked to {}, then to step {steps}",
            g.from_layers, r.model.num_layers
        ),
    )?;
    let random = val_curve(&dir.join("random/metrics.jsonl"))?;
    let mut grown: Vec<(f64, f64)> = val_curve(&dir.join("grown/stage1/metrics.jsonl"))?
        .into_iter()
        .filter(|(s, _)| *s <= grow_step as f64)
        .collect();
    grown.extend(val_curve(&dir.join("grown/metrics.jsonl"))?);
    let last = |c: &[(f64, f64)]| c.last().map_or(f64::NAN, |p| p.1);
    let (fa, fb) = (last(&random), last(&grown));
    let lower = if fb < fa { "grown" } else { "random" };
    let results = serde_json::json!({
        "recipe": recipe.display().to_string(),
        "steps": steps,
        "tokens": steps as u64 * per_step,
        "grow_at_step": grow_step,
        "from_layers": g.from_layers,
        "layers": r.model.num_layers,
        "optimizer_at_growth": g.optimizer,
        "random_val_loss": random,
        "grown_val_loss": grown,
        "final_random": fa,
        "final_grown": fb,
        "lower": lower,
        "wall_s": {"random": random_s, "grown": grown_s},
    });
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&results)? + "\n",
    )?;
    let png = dir.join("growth.png");
    // From the first evaluation after initialization: step 0's loss would flatten the rest.
    let after_init = |c: &[(f64, f64)]| c.iter().copied().filter(|p| p.0 > 0.0).collect::<Vec<_>>();
    line_chart(
        &png,
        &format!("validation loss: random init vs grown at step {grow_step}"),
        "step",
        "validation loss",
        &[
            Curve {
                label: format!("(a) {} layers, random init", r.model.num_layers),
                points: after_init(&random),
                color: palette(0),
                dashed: false,
            },
            Curve {
                label: format!(
                    "(b) {} layers, stacked x{} at step {grow_step}",
                    g.from_layers,
                    r.model.num_layers / g.from_layers
                ),
                points: after_init(&grown),
                color: palette(1),
                dashed: false,
            },
        ],
    )?;
    println!(
        "final validation loss after {steps} steps: random init {fa:.4}, grown {fb:.4} ({lower} ends lower, by {:.4}); wall {random_s:.0} s vs {grown_s:.0} s",
        (fa - fb).abs()
    );
    println!("{}", png.display());
    println!("{}", dir.join("results.json").display());
    Ok(())
}

/// The `--set`s that scale the proxy's width by `m` (hidden, heads of the same size, the
/// latent ranks and every intermediate size).
fn widen(r: &catapult_trainer::Recipe, m: usize) -> Vec<String> {
    let c = &r.model;
    vec![
        format!("model.hidden_size={}", c.hidden_size * m),
        format!("model.num_attention_heads={}", c.num_attention_heads * m),
        format!("model.q_lora_rank={}", c.q_lora_rank * m),
        format!("model.kv_lora_rank={}", c.kv_lora_rank * m),
        format!("model.ffn_hidden_size={}", c.ffn_hidden_size * m),
        format!(
            "model.expert_ffn_hidden_size={}",
            c.expert_ffn_hidden_size * m
        ),
        format!("transfer.proxy.hidden_size={}", c.hidden_size),
    ]
}

/// The LR grid on the proxy and on each target width.
pub fn transfer(
    proxy: &Path,
    multipliers: &[usize],
    lrs: &[f64],
    steps: usize,
    dir: &Path,
) -> Result<(), crate::Failure> {
    let r = crate::load_recipe(proxy, &Default::default())?;
    if lrs.len() < 3 {
        return Err(anyhow::anyhow!("--lrs: give at least 3 learning rates").into());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let mut widths = vec![1usize];
    widths.extend(multipliers.iter().copied().filter(|&m| m > 1));
    let mut table = Vec::new();
    let mut curves = Vec::new();
    for (i, &m) in widths.iter().enumerate() {
        let width = r.model.hidden_size * m;
        let mut finals = Vec::new();
        for &lr in lrs {
            let out = dir.join(format!("w{width}-lr{lr}"));
            let mut sets = common(&out, steps, steps);
            sets.push(format!("train.lr={lr}"));
            sets.push(format!("train.min_lr={}", lr / 10.0));
            if m > 1 {
                sets.extend(widen(&r, m));
            }
            train(proxy, &sets, &format!("width {width}, lr {lr}"))?;
            let curve = val_curve(&out.join("metrics.jsonl"))?;
            finals.push(curve.last().map_or(f64::NAN, |p| p.1));
        }
        let best = (0..lrs.len())
            .min_by(|&a, &b| finals[a].total_cmp(&finals[b]))
            .expect("a grid");
        curves.push(Curve {
            label: format!("width {width}{}", if m == 1 { " (proxy)" } else { "" }),
            points: lrs
                .iter()
                .zip(&finals)
                .map(|(lr, l)| (lr.log2(), *l))
                .collect(),
            color: palette(i),
            dashed: false,
        });
        table.push(serde_json::json!({
            "width": width,
            "multiplier": m,
            "lrs": lrs,
            "final_val_loss": finals,
            "best_lr": lrs[best],
            "best_index": best,
        }));
    }
    let proxy_best = table[0]["best_index"].as_u64().expect("an index") as i64;
    let mut ok = true;
    for row in table.iter_mut().skip(1) {
        let steps_off = (row["best_index"].as_u64().expect("an index") as i64 - proxy_best).abs();
        row["grid_steps_from_transferred"] = steps_off.into();
        row["within_one_step"] = (steps_off <= 1).into();
        ok &= steps_off <= 1;
    }
    let results = serde_json::json!({
        "proxy": proxy.display().to_string(),
        "steps": steps,
        "transferred_lr": lrs[proxy_best as usize],
        "widths": table,
        "transfer_within_one_step_everywhere": ok,
    });
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&results)? + "\n",
    )?;
    let png = dir.join("transfer.png");
    line_chart(
        &png,
        &format!("final validation loss after {steps} steps against the base learning rate"),
        "log2(learning rate)",
        "validation loss",
        &curves,
    )?;
    for row in &table {
        println!(
            "width {:>4}: best lr {} ({} grid steps from the proxy's {}); final losses {:?}",
            row["width"],
            row["best_lr"],
            row.get("grid_steps_from_transferred")
                .map_or("0".into(), |v| v.to_string()),
            lrs[proxy_best as usize],
            row["final_val_loss"]
                .as_array()
                .expect("losses")
                .iter()
                .map(|v| format!("{:.4}", v.as_f64().unwrap_or(f64::NAN)))
                .collect::<Vec<_>>()
        );
    }
    println!("the proxy's learning rate transfers within one grid step at every width: {ok}");
    println!("{}", png.display());
    Ok(())
}

/// Default LR grid: factors of 2 from tiny's 0.003 up (150-step runs prefer high rates;
/// the proxy's best, 0.012, is inside it).
pub fn default_lrs() -> Vec<f64> {
    vec![0.003, 0.006, 0.012, 0.024, 0.048]
}
