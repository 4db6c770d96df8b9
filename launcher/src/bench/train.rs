//! `catapult bench train`: the training step's speed against the project's PyTorch
//! baselines, measured in one run: our trainer (a `catapult train` child on both cores,
//! or two ranks under mpirun with expert parallelism), the eager model of
//! scripts/bench/eager_longcat.py, and `torch.compile` of it, on several shapes, in
//! interleaved rounds (the order rotates each round), each figure a median over the timed
//! steps of every round. The machine's large-matmul fp32 rate is measured in the same run
//! (before each round) and each shape's model FLOPs per second (the sizing module's
//! count, the trainer's `achieved_tflops`) is reported as a fraction of it.

use super::common::{
    create_dir, median, mpirun_train, python_json, spinner, step_lines_after_warmup, train_child,
};
use crate::UsageError;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Instant;

/// One benchmark shape: overrides of the base recipe and the ranks our trainer uses.
struct Shape {
    name: &'static str,
    sets: &'static [&'static str],
    ranks: usize,
    steps: usize,
}

/// Width 256: 2 layers, seq 256, batch 8.
const H256: &[&str] = &[
    "model.hidden_size=256",
    "model.q_lora_rank=128",
    "model.kv_lora_rank=64",
    "model.ffn_hidden_size=512",
    "model.expert_ffn_hidden_size=128",
    "data.seq_len=256",
    "train.global_batch_size=8",
    "train.micro_batch_size=8",
    "data.streams=8",
];

/// Width 512: 4 layers, 16 FFN + 8 zero experts, seq 512, vocab 4096, batch 8.
const H512: &[&str] = &[
    "model.hidden_size=512",
    "model.num_layers=4",
    "model.num_attention_heads=8",
    "model.q_lora_rank=256",
    "model.kv_lora_rank=128",
    "model.qk_nope_head_dim=64",
    "model.qk_rope_head_dim=32",
    "model.v_head_dim=64",
    "model.ffn_hidden_size=1024",
    "model.expert_ffn_hidden_size=256",
    "model.n_routed_experts=16",
    "model.zero_expert_num=8",
    "model.vocab_size=4096",
    "data.seq_len=512",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "data.streams=8",
];

const SHAPES: &[Shape] = &[
    Shape {
        name: "tiny",
        sets: &[],
        ranks: 1,
        steps: 24,
    },
    Shape {
        name: "tiny-ep2",
        sets: &["train.micro_batch_size=8"],
        ranks: 2,
        steps: 24,
    },
    Shape {
        name: "h256",
        sets: H256,
        ranks: 1,
        steps: 12,
    },
    Shape {
        name: "h512",
        sets: H512,
        ranks: 1,
        steps: 8,
    },
    Shape {
        name: "h512-ep2",
        sets: H512,
        ranks: 2,
        steps: 8,
    },
];

/// Steps each run discards before timing (allocator warm-up, compilation); the same 3
/// as `step_lines_after_warmup` drops from our runs.
const WARMUP: usize = 3;

/// The machine's fp32 rate on a large square matmul (FLOP/s; median of 5 on 2 threads).
fn matmul_rate() -> f64 {
    tch::set_num_threads(2);
    let n = 2048i64;
    let opts = (tch::Kind::Float, tch::Device::Cpu);
    let a = tch::Tensor::randn([n, n], opts);
    let b = tch::Tensor::randn([n, n], opts);
    let _ = a.matmul(&b);
    let times: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let c = a.matmul(&b);
            let s = t.elapsed().as_secs_f64();
            drop(c);
            s
        })
        .collect();
    2.0 * (n * n * n) as f64 / median(times)
}

/// The per-step lines after warm-up of one run of our trainer on `shape`.
fn ours(recipe: &Path, shape: &Shape, steps: usize, out: &Path) -> anyhow::Result<Vec<Value>> {
    let mut sets: Vec<String> = shape.sets.iter().map(|s| s.to_string()).collect();
    // The learning rate warms up over the whole run (mpirun_train's default is no
    // warm-up): the router stays near its initial state, as in the baselines' short runs.
    sets.extend([
        "checkpoint.every=0".into(),
        format!("train.warmup_steps={steps}"),
    ]);
    if shape.ranks > 1 {
        sets.push(format!("parallel.expert={}", shape.ranks));
        return mpirun_train(recipe, shape.ranks, steps, &sets, out);
    }
    sets.extend([
        format!("output.dir={}", out.display()),
        format!("train.steps={steps}"),
        format!("train.eval_every={steps}"),
        "train.eval_sequences=8".into(),
        "train.log_every=1".into(),
        "parallel.expert=1".into(),
        "system.threads=2".into(),
    ]);
    train_child(recipe, &sets, &format!("catapult on {}", shape.name))?;
    step_lines_after_warmup(out)
}

/// The resolved recipe of `shape`, also written as JSON for the Python baselines (one
/// process, both cores).
fn recipe_json(
    recipe: &Path,
    shape: &Shape,
    path: &Path,
) -> anyhow::Result<catapult_trainer::Recipe> {
    let overrides: Vec<catapult_trainer::Override> = shape
        .sets
        .iter()
        .map(|s| s.to_string())
        .chain(["system.threads=2".into(), "parallel.expert=1".into()])
        .map(|s| catapult_trainer::Override::parse(&s))
        .collect::<Result<_, _>>()?;
    let r = catapult_trainer::recipe::load(recipe, &overrides)?;
    std::fs::write(path, serde_json::to_string_pretty(&r)?)?;
    Ok(r)
}

/// Timed samples of one shape, pooled over rounds.
#[derive(Default)]
struct Samples {
    ours: Vec<f64>,
    achieved: Vec<f64>,
    eager: Vec<f64>,
    compiled: Vec<f64>,
    compile_warmup_s: Vec<f64>,
    /// FFN experts per token of each implementation's timed steps (ours, eager, compile).
    ffn: [Vec<f64>; 3],
}

/// One round of one shape: the three implementations in an order that rotates by round.
fn round(
    ctx: &Ctx,
    shape: &Shape,
    steps: usize,
    rnd: usize,
    s: &mut Samples,
) -> anyhow::Result<()> {
    let json_path = ctx.dir.join(format!("{}.recipe.json", shape.name));
    for k in 0..3 {
        let which = (k + rnd) % 3;
        let p = spinner(&format!(
            "round {}: {} {}",
            rnd + 1,
            shape.name,
            ["catapult", "eager", "compile"][which]
        ));
        if which == 0 {
            let out = ctx.dir.join(format!("run-{}", shape.name));
            for l in ours(ctx.recipe, shape, steps, &out)? {
                s.ours.extend(l["tokens_per_s"].as_f64());
                s.ffn[0].extend(l["ffn_experts_per_token"].as_f64());
                s.achieved
                    .extend(l["achieved_tflops"].as_f64().map(|t| t * 1e12));
            }
        } else {
            let mode = if which == 1 { "eager" } else { "compile" };
            let steps_arg = steps.to_string();
            let warmup_arg = WARMUP.to_string();
            let v = python_json(
                ctx.python,
                "eager_longcat.py",
                &[
                    json_path.as_os_str(),
                    steps_arg.as_ref(),
                    mode.as_ref(),
                    warmup_arg.as_ref(),
                ],
            )?;
            let rates = v["rates"].as_array().into_iter().flatten();
            let into = if which == 1 {
                &mut s.eager
            } else {
                &mut s.compiled
            };
            into.extend(rates.filter_map(Value::as_f64));
            if which == 2 {
                s.compile_warmup_s.extend(v["warmup_s"].as_f64());
            }
            s.ffn[which].extend(v["ffn_experts_per_token"].as_f64());
        }
        p.finish_and_clear();
    }
    Ok(())
}

struct Ctx<'a> {
    recipe: &'a Path,
    python: &'a Path,
    dir: &'a Path,
}

fn summarize(shape: &Shape, r: &catapult_trainer::Recipe, s: Samples, rate: f64) -> Value {
    // Our achieved FLOP/s is per rank; the rate is of both cores (2 threads): with two
    // 1-thread ranks, the ranks' sum is what the rate bounds.
    let achieved = median(s.achieved) * shape.ranks as f64;
    let counts = [s.ours.len(), s.eager.len(), s.compiled.len()];
    let (o, e, c) = (median(s.ours), median(s.eager), median(s.compiled));
    // Each implementation's model FLOP/s with its own FFN experts per token (the routers
    // drift differently): a ratio of work done per second, not of tokens.
    let ffn = s.ffn.map(|v| v.iter().sum::<f64>() / v.len().max(1) as f64);
    let flops = |ffn: f64, tokens_per_s: f64| {
        catapult_trainer::sizing::flops_per_token_uniform(&r.model, r.data.seq_len, ffn)
            * tokens_per_s
    };
    let work = [flops(ffn[0], o), flops(ffn[1], e), flops(ffn[2], c)];
    json!({
        "ffn_experts_per_token": {"catapult": ffn[0], "eager": ffn[1], "compile": ffn[2]},
        "model_flops_per_s": {"catapult": work[0], "eager": work[1], "compile": work[2]},
        "flops_ratio_over_eager": work[0] / work[1],
        "flops_ratio_over_compile": work[0] / work[2],
        "shape": shape.name,
        "sets": shape.sets,
        "ranks": shape.ranks,
        "tokens_per_s": {"catapult": o, "eager": e, "compile": c},
        "ratio_over_eager": o / e,
        "ratio_over_compile": o / c,
        "achieved_flops_per_s": achieved,
        "fraction_of_matmul_rate": achieved / rate,
        "compile_warmup_s": median(s.compile_warmup_s),
        "samples": {"catapult": counts[0], "eager": counts[1], "compile": counts[2]},
    })
}

fn print_table(rate: f64, rates: &[f64], rows: &[Value]) {
    println!(
        "large-matmul fp32 rate (2048^3, 2 threads): {:.1} GFLOP/s median of {} (range {:.1}-{:.1})",
        rate / 1e9,
        rates.len(),
        rates.iter().copied().fold(f64::INFINITY, f64::min) / 1e9,
        rates.iter().copied().fold(0.0, f64::max) / 1e9
    );
    println!(
        "{:<10} {:>5} {:>10} {:>10} {:>10} {:>8} {:>8} {:>14} {:>9} {:>8} {:>15}",
        "shape",
        "ranks",
        "catapult",
        "eager",
        "compile",
        "/eager",
        "/compile",
        "FLOP/s ratios",
        "GFLOP/s",
        "of rate",
        "ffn/tok o/e/c"
    );
    for r in rows {
        let t = &r["tokens_per_s"];
        let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
        let ffn = &r["ffn_experts_per_token"];
        println!(
            "{:<10} {:>5} {:>10.0} {:>10.0} {:>10.0} {:>7.2}x {:>7.2}x {:>6.2}x {:>6.2}x {:>9.1} {:>7.1}% {:>15}",
            r["shape"].as_str().unwrap_or("?"),
            r["ranks"],
            f(&t["catapult"]),
            f(&t["eager"]),
            f(&t["compile"]),
            f(&r["ratio_over_eager"]),
            f(&r["ratio_over_compile"]),
            f(&r["flops_ratio_over_eager"]),
            f(&r["flops_ratio_over_compile"]),
            f(&r["achieved_flops_per_s"]) / 1e9,
            f(&r["fraction_of_matmul_rate"]) * 100.0,
            format!(
                "{:.2}/{:.2}/{:.2}",
                f(&ffn["catapult"]),
                f(&ffn["eager"]),
                f(&ffn["compile"])
            )
        );
    }
}

pub(super) struct Args<'a> {
    pub recipe: &'a Path,
    pub shapes: &'a [String],
    pub steps: Option<usize>,
    pub repeats: usize,
    pub python: &'a Path,
    pub dir: &'a Path,
}

pub(super) fn run(a: &Args) -> Result<(), crate::Failure> {
    let chosen: Vec<&Shape> = if a.shapes.is_empty() {
        SHAPES.iter().collect()
    } else {
        a.shapes
            .iter()
            .map(|n| {
                SHAPES.iter().find(|s| s.name == n).ok_or_else(|| {
                    let names: Vec<&str> = SHAPES.iter().map(|s| s.name).collect();
                    UsageError::new(format!(
                        "--shapes {n}: no such shape; choose from {}",
                        names.join(", ")
                    ))
                })
            })
            .collect::<Result<_, _>>()?
    };
    if a.steps.is_some_and(|s| s <= WARMUP) {
        return Err(UsageError::new(format!(
            "--steps: use more than {WARMUP} (the first {WARMUP} are warm-up)"
        ))
        .into());
    }
    create_dir(a.dir)?;
    let ctx = Ctx {
        recipe: a.recipe,
        python: a.python,
        dir: a.dir,
    };
    let recipes: Vec<catapult_trainer::Recipe> = chosen
        .iter()
        .map(|shape| {
            recipe_json(
                a.recipe,
                shape,
                &a.dir.join(format!("{}.recipe.json", shape.name)),
            )
        })
        .collect::<Result<_, _>>()?;
    let mut samples: Vec<Samples> = chosen.iter().map(|_| Samples::default()).collect();
    let mut rates = Vec::new();
    for rnd in 0..a.repeats.max(1) {
        rates.push(matmul_rate());
        for (shape, s) in chosen.iter().zip(samples.iter_mut()) {
            round(&ctx, shape, a.steps.unwrap_or(shape.steps), rnd, s)?;
        }
    }
    rates.push(matmul_rate());
    let rate = median(rates.clone());
    let rows: Vec<Value> = chosen
        .iter()
        .zip(&recipes)
        .zip(samples)
        .map(|((shape, r), s)| summarize(shape, r, s, rate))
        .collect();
    let results = json!({
        "recipe": a.recipe.display().to_string(),
        "rounds": a.repeats.max(1),
        "warmup_steps": WARMUP,
        "matmul_rate_flops_per_s": rate,
        "matmul_rates": rates,
        "shapes": rows,
    });
    std::fs::write(
        a.dir.join("results.json"),
        serde_json::to_string_pretty(&results).expect("a JSON value always serializes"),
    )?;
    print_table(rate, &rates, &rows);
    println!("results: {}", a.dir.join("results.json").display());
    Ok(())
}
