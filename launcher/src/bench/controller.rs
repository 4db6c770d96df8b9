//! `catapult bench controller`: the expert-bias controller's modes (`hold`, the default,
//! against `longcat`, `pid` and `sign`) on three recipes, same seed and budget: per
//! layer, the worst overshoot and undershoot of FFN experts per token after it settled,
//! its mean and mean absolute error over the second half (and the step-to-step scatter
//! around its moving average, which no bias set before a batch can remove), the step
//! from which its 20-step moving average stays within 2% of K_e, and the final
//! validation loss (results.json, a table on stdout); one PNG per recipe and mode of
//! FFN experts per token per layer. Each run is a `catapult train` process on one rank,
//! on the built-in corpus.

use super::common::{create_dir, train_child};
use crate::plot::{line_chart, palette, Curve};
use crate::UsageError;
use serde_json::{json, Value};
use std::path::Path;

/// The band a layer must stay in: 2% of K_e.
const BAND: f64 = 0.02;
/// Steps of the moving average `settle` smooths the batch's sampling noise with.
const WINDOW: usize = 20;

/// The three recipes: tiny as it is, a 4-layer model with N 16, Z 8, K 4, K_e 3, and
/// tiny with K_e = 1 (name, overrides of tiny.yaml).
pub(super) fn recipes() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        ("tiny", vec![]),
        (
            "n16-k4-ke3",
            vec![
                "model.num_layers=4",
                "model.n_routed_experts=16",
                "model.zero_expert_num=8",
                "model.moe_topk=4",
                "model.target_ffn_experts=3",
            ],
        ),
        ("ke1", vec!["model.target_ffn_experts=1"]),
    ]
}

/// The overrides of each mode (`pid` with proportional and derivative terms, so that it
/// is not `longcat`).
fn mode_sets(mode: &str) -> Result<Vec<String>, UsageError> {
    let sets: &[&str] = match mode {
        "hold" | "longcat" | "sign" => &[],
        "pid" => &["moe.bias_control.kp=0.05", "moe.bias_control.kd=0.01"],
        other => {
            return Err(UsageError::new(format!(
                "--modes: unknown mode `{other}`; use hold, longcat, pid or sign"
            )))
        }
    };
    let mut out = vec![format!("moe.bias_control.mode={mode}")];
    out.extend(sets.iter().map(|s| s.to_string()));
    Ok(out)
}

/// How one layer's FFN experts per token `y` (one value per step) tracked `ke`.
pub(super) fn layer_stats(y: &[f64], ke: f64) -> Value {
    let rel = |v: f64| (v - ke) / ke;
    let n = y.len();
    let half = &y[n / 2..];
    let mae = half.iter().map(|&v| rel(v).abs()).sum::<f64>() / half.len().max(1) as f64;
    let mean = half.iter().sum::<f64>() / half.len().max(1) as f64;
    // The moving average over the last WINDOW steps, from step WINDOW on.
    let smooth: Vec<f64> = (WINDOW..=n)
        .map(|i| y[i - WINDOW..i].iter().sum::<f64>() / WINDOW as f64)
        .collect();
    let last_out = smooth.iter().rposition(|&v| rel(v).abs() > BAND);
    let settle = match last_out {
        None => Some(WINDOW),
        Some(i) if i + 1 < smooth.len() => Some(i + 1 + WINDOW),
        Some(_) => None,
    };
    let after = settle.map_or(&y[n..], |s| &y[s.min(n)..]);
    // The step-to-step scatter around the moving average over the second half: the
    // part of the error no bias set before the batch can remove.
    let start = (n / 2).max(WINDOW);
    let noise = (start..=n)
        .map(|i| (y[i - 1] - smooth[i - WINDOW]).abs() / ke)
        .sum::<f64>()
        / (n + 1 - start).max(1) as f64;
    let worst = |xs: &[f64], f: &dyn Fn(f64) -> f64| xs.iter().map(|&v| f(v)).fold(0.0, f64::max);
    json!({
        "second_half_mean": mean,
        "second_half_mean_error": rel(mean),
        "second_half_mae": mae,
        "second_half_scatter": noise,
        "settle_step": settle,
        "overshoot_after_settling": worst(after, &|v| rel(v)),
        "undershoot_after_settling": worst(after, &|v| -rel(v)),
        "overshoot_whole_run": worst(&y[1.min(n)..], &|v| rel(v)),
        "undershoot_whole_run": worst(&y[1.min(n)..], &|v| -rel(v)),
    })
}

/// Per layer, FFN experts per token at every step of a run's metrics.
fn per_layer(metrics: &Path) -> anyhow::Result<Vec<Vec<(f64, f64)>>> {
    let text = std::fs::read_to_string(metrics)?;
    let mut layers: Vec<Vec<(f64, f64)>> = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let (Some(step), Some(ys)) = (
            v["step"].as_f64(),
            v.get("ffn_experts_per_token_per_layer")
                .and_then(Value::as_array),
        ) else {
            continue;
        };
        layers.resize(ys.len(), Vec::new());
        for (l, y) in ys.iter().enumerate() {
            layers[l].push((step, y.as_f64().unwrap_or(f64::NAN)));
        }
    }
    Ok(layers)
}

fn last_val_loss(metrics: &Path) -> anyhow::Result<f64> {
    Ok(std::fs::read_to_string(metrics)?
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v.get("val_loss")?.as_f64())
        .unwrap_or(f64::NAN))
}

/// One recipe in one mode (with the caller's `extra` overrides): its run, its
/// statistics and its PNG.
fn one(
    tiny: &Path,
    (name, sets, extra): (&str, &[&str], &[String]),
    (mode, steps): (&str, usize),
    dir: &Path,
) -> anyhow::Result<Value> {
    let out = dir.join(format!("{name}-{mode}"));
    let mut all = vec![
        format!("output.dir={}", out.display()),
        format!("train.steps={steps}"),
        format!("train.eval_every={steps}"),
        "train.eval_sequences=64".into(),
        "train.log_every=1".into(),
        "parallel.expert=1".into(),
        "system.threads=2".into(),
        "checkpoint.every=0".into(),
    ];
    all.extend(sets.iter().map(|s| s.to_string()));
    all.extend(mode_sets(mode)?);
    all.extend(extra.iter().cloned());
    let overrides = crate::OverrideArgs { set: all.clone() };
    let recipe = crate::load_recipe(tiny, &overrides)?;
    let ke = recipe.model.target_ffn_experts() as f64;
    let wall = train_child(tiny, &all, &format!("{name}, {mode}, {steps} steps"))?;
    let metrics = out.join("metrics.jsonl");
    let layers = per_layer(&metrics)?;
    let stats: Vec<Value> = layers
        .iter()
        .map(|l| layer_stats(&l.iter().map(|p| p.1).collect::<Vec<_>>(), ke))
        .collect();
    let mut curves: Vec<Curve> = layers
        .iter()
        .enumerate()
        .map(|(l, points)| Curve {
            label: format!("layer {l}"),
            points: points.clone(),
            color: palette(l),
            dashed: false,
        })
        .collect();
    curves.push(Curve {
        label: format!("K_e = {ke}"),
        points: vec![(1.0, ke), (steps as f64, ke)],
        color: palette(7),
        dashed: true,
    });
    let png = dir.join(format!("{name}-{mode}.png"));
    line_chart(
        &png,
        &format!("{name}, bias control `{mode}`: FFN experts per token"),
        "step",
        "FFN experts per token",
        &curves,
    )?;
    Ok(json!({
        "recipe": name, "mode": mode, "target_ffn_experts": ke, "steps": steps,
        "layers": stats, "val_loss": last_val_loss(&metrics)?, "wall_s": wall,
        "png": png.display().to_string(),
    }))
}

/// Every mode on every recipe named in `only` (all when empty), each run with `extra`.
pub(super) fn run(
    tiny: &Path,
    (modes, only, extra): (&[String], &[String], &[String]),
    steps: usize,
    dir: &Path,
) -> Result<(), crate::Failure> {
    if steps < 2 * WINDOW {
        return Err(UsageError::new(format!("--steps: give at least {}", 2 * WINDOW)).into());
    }
    for m in modes {
        mode_sets(m)?;
    }
    let chosen: Vec<_> = recipes()
        .into_iter()
        .filter(|(n, _)| only.is_empty() || only.iter().any(|o| o == n))
        .collect();
    if chosen.is_empty() {
        return Err(UsageError::new("--recipes: none of tiny, n16-k4-ke3, ke1 named").into());
    }
    create_dir(dir)?;
    let mut results = Vec::new();
    for (name, sets) in &chosen {
        for mode in modes {
            results.push(one(tiny, (name, sets, extra), (mode, steps), dir)?);
        }
    }
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&json!({"band": BAND, "runs": results}))? + "\n",
    )?;
    print_table(&results);
    println!("{}", dir.join("results.json").display());
    Ok(())
}

fn print_table(results: &[Value]) {
    println!(
        "{:<11} {:<8} {:>5} {:>9} {:>9} {:>9} {:>9} {:>8} {:>9} {:>8}",
        "recipe",
        "mode",
        "layer",
        "MAE 2nd½",
        "scatter",
        "mean err",
        "settle@",
        "over",
        "under",
        "val loss"
    );
    for r in results {
        for (l, s) in r["layers"].as_array().into_iter().flatten().enumerate() {
            let pct = |k: &str| format!("{:.2}%", s[k].as_f64().unwrap_or(f64::NAN) * 100.0);
            let settle = s["settle_step"]
                .as_u64()
                .map_or("never".to_string(), |v| v.to_string());
            println!(
                "{:<11} {:<8} {:>5} {:>9} {:>9} {:>9} {:>9} {:>8} {:>9} {:>8.4}",
                r["recipe"].as_str().unwrap_or(""),
                r["mode"].as_str().unwrap_or(""),
                l,
                pct("second_half_mae"),
                pct("second_half_scatter"),
                pct("second_half_mean_error"),
                settle,
                pct("overshoot_after_settling"),
                pct("undershoot_after_settling"),
                r["val_loss"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
}
