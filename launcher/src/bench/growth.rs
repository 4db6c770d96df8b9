//! `catapult bench growth`: (a) the deep recipe from random init against (b) its
//! half-depth model trained for half the tokens, stacked, and trained on, with the same
//! total tokens; validation-loss curves (growth.png), which ends lower, and results.json.
//! Each run is a `catapult train` process on one rank, on the built-in corpus.

use super::common::{common_sets, create_dir, train_child, val_curve};
use crate::plot::{line_chart, palette, Curve};
use crate::UsageContext;
use std::path::Path;

/// (a) random init against (b) grown, same total tokens.
pub(super) fn run(
    recipe: &Path,
    steps: usize,
    eval_every: usize,
    dir: &Path,
) -> Result<(), crate::Failure> {
    let r = crate::load_recipe(recipe, &Default::default())?;
    let g = r.growth.clone().usage_context(|| {
        format!(
            "{}: has no growth section; give a recipe with one (--recipe)",
            recipe.display()
        )
    })?;
    create_dir(dir)?;
    let per_step = (r.train.global_batch_size * r.data.seq_len) as u64;
    let grow_step = steps / 2;
    let until = grow_step as u64 * per_step;
    let mut a = common_sets(&dir.join("random"), steps, eval_every);
    a.push("growth=null".into());
    let random_s = train_child(
        recipe,
        &a,
        &format!(
            "(a) {} layers from random init, {steps} steps",
            r.model.num_layers
        ),
    )?;
    let mut b = common_sets(&dir.join("grown"), steps, eval_every);
    b.push(format!("growth.until_tokens={until}"));
    let grown_s = train_child(
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
