//! `catapult plan RECIPE --gpu GPU --world N`: the layouts the recipe could run with on
//! that cluster, the ones that fit memory ranked by predicted step time, printed as
//! recipe overrides; where none reaches a stated target, by how much and what a
//! missing dimension would change. The search and the estimates are the trainer's
//! (`planner`, `sizing`); this module parses the flags and prints.

use crate::dry_run::{gib, secs};
use crate::UsageError;
use catapult_trainer::planner::{missing_dimensions, search, Candidate, Goal, Search};
use catapult_trainer::sizing::Cluster;
use catapult_trainer::Recipe;
use clap::Args;
use std::path::PathBuf;

/// Flags of `catapult plan`.
#[derive(Args)]
pub struct PlanArgs {
    /// The recipe (YAML).
    pub recipe: PathBuf,
    #[command(flatten)]
    pub overrides: crate::OverrideArgs,
    /// The accelerator: a100, h100, h800, h200, b200, mi300x.
    #[arg(long)]
    pub gpu: String,
    /// GPUs in the job (one rank each).
    #[arg(long)]
    pub world: usize,
    /// Memory per GPU, GiB (default: the accelerator's).
    #[arg(long)]
    pub memory_gib: Option<f64>,
    /// Fraction of the memory kept free (fragmentation, the allocator, NCCL buffers).
    #[arg(long, default_value_t = 0.1)]
    pub headroom: f64,
    /// Tokens to train on (e.g. 20e12): prints the days of each layout.
    #[arg(long)]
    pub tokens: Option<f64>,
    /// Days the tokens should take: says whether a layout reaches it, and by how much not.
    #[arg(long, default_value_t = 30.0)]
    pub days: f64,
    /// Per-GPU interconnect bandwidth between nodes for the collectives, GB/s.
    #[arg(long, default_value_t = 50.0)]
    pub link_gbps: f64,
    /// NVLink bandwidth inside a node, GB/s (for the tensor-parallel estimate; default
    /// 400 for h800, 900 for others).
    #[arg(long)]
    pub nvlink_gbps: Option<f64>,
    /// Fraction of the GPU's peak the compute achieves.
    #[arg(long, default_value_t = 0.4)]
    pub mfu: f64,
    /// Layouts to print.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The cluster and goal the flags describe (bad flags are exit 2).
fn parse(args: &PlanArgs) -> Result<(Cluster, Goal, f64), UsageError> {
    let gpu = crate::dry_run::gpu_flag(&args.gpu)?;
    let bad = |flag: &str, v: f64, want: &str| UsageError::new(format!("--{flag} {v}: use {want}"));
    if args.world == 0 {
        return Err(UsageError::new(
            "--world 0: use the number of GPUs (at least 1)",
        ));
    }
    if !(args.mfu > 0.0 && args.mfu <= 1.0) {
        return Err(bad("mfu", args.mfu, "a fraction in (0, 1]"));
    }
    if !(0.0..1.0).contains(&args.headroom) {
        return Err(bad("headroom", args.headroom, "a fraction in [0, 1)"));
    }
    for (flag, v) in [
        ("link-gbps", Some(args.link_gbps)),
        ("memory-gib", args.memory_gib),
        ("nvlink-gbps", args.nvlink_gbps),
        ("tokens", args.tokens),
        ("days", Some(args.days)),
    ] {
        if let Some(v) = v.filter(|v| !(*v > 0.0 && v.is_finite())) {
            return Err(bad(flag, v, "a positive number"));
        }
    }
    let cluster = Cluster {
        gpu,
        gpus: args.world,
        link_gbps: args.link_gbps,
        mfu: args.mfu,
    };
    let goal = Goal {
        memory_bytes: args.memory_gib.unwrap_or(gpu.memory_gib) * (1u64 << 30) as f64,
        headroom: args.headroom,
        target: args.tokens.map(|t| (t, args.days)),
    };
    let nvlink = args
        .nvlink_gbps
        .unwrap_or(if gpu.name == "h800" { 400.0 } else { 900.0 });
    Ok((cluster, goal, nvlink))
}

/// Runs the planner and prints (or writes JSON).
pub fn run(recipe: &Recipe, args: &PlanArgs) -> anyhow::Result<()> {
    let (cluster, goal, nvlink) = parse(args)?;
    let mut found = search(recipe, &cluster, &goal);
    // A batch that does not cover the world: plan with the smallest one that does, and
    // say so (the override is part of every proposed layout).
    let mut planned = recipe.clone();
    let mut batch = None;
    if found.fits.is_empty() && found.too_big.is_empty() {
        let g = recipe.train.global_batch_size.div_ceil(args.world).max(1) * args.world;
        planned.train.global_batch_size = g;
        if let Some((tokens, _)) = goal.target {
            let per_step = (g * recipe.data.max_seq_len()) as f64;
            planned.train.steps = (tokens / per_step).ceil() as usize;
        }
        let again = search(&planned, &cluster, &goal);
        let ruled_out = std::mem::take(&mut found.ruled_out);
        found = Search { ruled_out, ..again };
        batch = Some(g);
    }
    let missing = found
        .fits
        .first()
        .or(found.too_big.first())
        .map(|c| {
            let batch = recipe.train.global_batch_size;
            missing_dimensions(c, (&planned, batch), nvlink, goal.target)
        })
        .unwrap_or_default();
    if args.json {
        let v = serde_json::json!({
            "recipe": recipe.name, "cluster": cluster, "goal": goal,
            "budget_bytes": goal.budget(), "batch_override": batch,
            "fits": found.fits.iter().take(args.top).map(|c| layout_json(c, &planned, args.world, batch)).collect::<Vec<_>>(),
            "fit_count": found.fits.len(), "too_big_count": found.too_big.len(),
            "smallest": found.too_big.first().map(|c| layout_json(c, &planned, args.world, batch)),
            "ruled_out": found.ruled_out, "compute_floor_days": found.compute_floor_days,
            "missing_dimensions": missing,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print_header(recipe, args, &cluster, &goal);
    for why in &found.ruled_out {
        println!("ruled out: {why}");
    }
    if let Some(g) = batch {
        println!(
            "planned with train.global_batch_size={g} instead ({:.1}x the recipe's tokens per \
             step; train.steps={} for the target): a change of the training recipe, listed in \
             every layout below",
            g as f64 / recipe.train.global_batch_size as f64,
            planned.train.steps
        );
    }
    print_layouts(&found, &planned, args, batch);
    print_target(&found, &goal, &cluster);
    print_missing(&missing, &goal);
    Ok(())
}

fn layout_json(c: &Candidate, r: &Recipe, world: usize, batch: Option<usize>) -> serde_json::Value {
    let mut v = serde_json::to_value(c).expect("candidates serialize");
    v["overrides"] = overrides(c, r, world, batch).into();
    v["memory"] = serde_json::to_value(c.plan.memory).expect("memory serializes");
    v["time"] = serde_json::to_value(c.plan.time).expect("times serialize");
    v
}

fn overrides(c: &Candidate, r: &Recipe, world: usize, batch: Option<usize>) -> Vec<String> {
    let mut sets = c.overrides(world);
    if let Some(g) = batch {
        sets.push(format!("train.global_batch_size={g}"));
        sets.push(format!("train.steps={}", r.train.steps));
    }
    sets
}

fn print_header(recipe: &Recipe, args: &PlanArgs, cluster: &Cluster, goal: &Goal) {
    println!(
        "{}: layouts on {} x {} ({}, {:.0}% kept free: {} usable per GPU), {} GB/s links, MFU {}",
        recipe.name,
        cluster.gpus,
        cluster.gpu.name,
        gib(goal.memory_bytes),
        100.0 * goal.headroom,
        gib(goal.budget()),
        args.link_gbps,
        cluster.mfu
    );
}

fn print_layouts(found: &Search, r: &Recipe, args: &PlanArgs, batch: Option<usize>) {
    let shown: Vec<&Candidate> = found.fits.iter().take(args.top).collect();
    println!(
        "{} layouts fit, {} do not; the fastest {} (step time as the trainer overlaps its \
         collectives):",
        found.fits.len(),
        found.too_big.len(),
        shown.len()
    );
    println!(
        "  {:>2} {:>6} {:>6} {:<10} {:<9} {:>5} {:>12} {:>10} {:>8}",
        "#", "expert", "data", "shard", "recompute", "micro", "memory/rank", "step", "days"
    );
    for (i, c) in shown.iter().enumerate() {
        let sets = c.overrides(args.world);
        let value = |k: &str| {
            sets.iter()
                .find_map(|s| s.strip_prefix(&format!("{k}=")).map(str::to_string))
                .unwrap_or_default()
        };
        println!(
            "  {:>2} {:>6} {:>6} {:<10} {:<9} {:>5} {:>12} {:>10} {:>8}",
            i + 1,
            c.expert,
            args.world / c.expert,
            value("parallel.shard"),
            value("train.recompute"),
            c.micro,
            gib(c.memory_bytes),
            secs(c.step_s),
            c.days.map_or("-".into(), |d| format!("{d:.1}"))
        );
    }
    if let Some(best) = shown.first() {
        let sets: Vec<String> = overrides(best, r, args.world, batch)
            .iter()
            .map(|s| format!("--set {s}"))
            .collect();
        println!(
            "best: catapult train {} {}",
            args.recipe.display(),
            sets.join(" ")
        );
    } else if let Some(small) = found.too_big.first() {
        println!(
            "none fits: the smallest valid layout (expert {}, shard {:?}, recompute {:?}, \
             micro {}) needs {} per rank",
            small.expert,
            small.shard,
            small.recompute,
            small.micro,
            gib(small.memory_bytes)
        );
    }
}

fn print_target(found: &Search, goal: &Goal, cluster: &Cluster) {
    let Some((tokens, days)) = goal.target else {
        return;
    };
    let best = found.fits.first().and_then(|c| c.days);
    match best {
        Some(d) if d <= days => {
            println!("target {tokens:.3e} tokens in {days} days: reached ({d:.1} days)")
        }
        Some(d) => println!(
            "target {tokens:.3e} tokens in {days} days: not reached; the best layout takes \
             {d:.1} days, {:.2}x the target",
            d / days
        ),
        None => println!("target {tokens:.3e} tokens in {days} days: no layout fits"),
    }
    if let Some(floor) = found.compute_floor_days {
        let need = (cluster.gpus as f64 * floor / days).ceil();
        println!(
            "  compute alone takes {floor:.1} days on {} GPUs at MFU {}{}",
            cluster.gpus,
            cluster.mfu,
            match floor > days {
                true => format!(
                    ": no layout of {} GPUs can reach the target; it needs about {need:.0} GPUs, \
                     or MFU {:.2}",
                    cluster.gpus,
                    cluster.mfu * floor / days
                ),
                false => String::new(),
            }
        );
    }
}

fn print_missing(missing: &[catapult_trainer::planner::Missing], goal: &Goal) {
    if missing.is_empty() {
        return;
    }
    println!(
        "dimensions catapult does not have, applied to the best layout (estimates from the same \
         arithmetic):"
    );
    for m in missing {
        println!(
            "  {:<8} {:>2}: {:>10}/rank ({}), step {:>9}{}  [{}]",
            m.dimension,
            m.degree,
            gib(m.memory_bytes),
            match m.memory_bytes <= goal.budget() {
                true => "fits",
                false => "too big",
            },
            secs(m.step_s),
            m.days.map_or(String::new(), |d| format!(", {d:.1} days")),
            m.assumes
        );
    }
}
