//! `catapult bench transfer`: a learning-rate grid on the width proxy, then the same grid
//! at wider widths with `transfer.proxy` set; whether the proxy's best rate is within one
//! grid step of the best at each target width (transfer.png, results.json). Each run is a
//! `catapult train` process on one rank, on the built-in corpus.

use super::common::{common_sets, create_dir, train_child, val_curve};
use crate::plot::{line_chart, palette, Curve};
use crate::UsageError;
use std::path::Path;

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
pub(super) fn run(
    proxy: &Path,
    multipliers: &[usize],
    lrs: &[f64],
    steps: usize,
    dir: &Path,
) -> Result<(), crate::Failure> {
    let r = crate::load_recipe(proxy, &Default::default())?;
    if lrs.len() < 3 {
        return Err(UsageError::new("--lrs: give at least 3 learning rates").into());
    }
    create_dir(dir)?;
    let mut widths = vec![1usize];
    widths.extend(multipliers.iter().copied().filter(|&m| m > 1));
    let mut table = Vec::new();
    let mut curves = Vec::new();
    for (i, &m) in widths.iter().enumerate() {
        let width = r.model.hidden_size * m;
        let mut finals = Vec::new();
        for &lr in lrs {
            let out = dir.join(format!("w{width}-lr{lr}"));
            let mut sets = common_sets(&out, steps, steps);
            sets.push(format!("train.lr={lr}"));
            sets.push(format!("train.min_lr={}", lr / 10.0));
            if m > 1 {
                sets.extend(widen(&r, m));
            }
            train_child(proxy, &sets, &format!("width {width}, lr {lr}"))?;
            let curve = val_curve(&out.join("metrics.jsonl"))?;
            finals.push(curve.last().map_or(f64::NAN, |p| p.1));
        }
        let best = (0..lrs.len())
            .min_by(|&a, &b| finals[a].total_cmp(&finals[b]))
            .expect("at least 3 rates (checked above)");
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
    let proxy_best = table[0]["best_index"]
        .as_u64()
        .expect("best_index is set for every width above") as i64;
    let mut ok = true;
    for row in table.iter_mut().skip(1) {
        let steps_off = (row["best_index"]
            .as_u64()
            .expect("best_index is set for every width above") as i64
            - proxy_best)
            .abs();
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
                .expect("final_val_loss is set for every width above")
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
pub(super) fn default_lrs() -> Vec<f64> {
    vec![0.003, 0.006, 0.012, 0.024, 0.048]
}
