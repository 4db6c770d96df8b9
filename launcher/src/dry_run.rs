//! `catapult train RECIPE --dry-run`: what the recipe would need, from arithmetic alone
//! (nothing is allocated, no data is read): parameters, FLOPs per token, memory per rank,
//! communication per step, and a step-time estimate on a stated cluster.

use crate::UsageError;
use catapult_trainer::sizing::{gpu_by_name, Cluster, Gpu, Plan, GPUS};
use catapult_trainer::Recipe;
use clap::Args;

/// The cluster a dry run estimates for.
#[derive(Args, Debug, Clone)]
pub struct DryRunArgs {
    /// Print what the recipe needs (parameters, FLOPs, memory per rank, communication,
    /// step time) without allocating anything, then exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Ranks (one GPU each) of the layout (default: parallel.data x parallel.expert, with
    /// data 0 counted as 1).
    #[arg(long, requires = "dry_run")]
    pub world: Option<usize>,
    /// The accelerator: a100, h100, h800, h200, b200, mi300x.
    #[arg(long, default_value = "h100", requires = "dry_run")]
    pub gpu: String,
    /// Per-GPU interconnect bandwidth for the collectives, GB/s.
    #[arg(long, default_value_t = 50.0, requires = "dry_run")]
    pub link_gbps: f64,
    /// Fraction of the GPU's peak the compute achieves.
    #[arg(long, default_value_t = 0.4, requires = "dry_run")]
    pub mfu: f64,
    /// Also print the days to train on this many tokens (e.g. 20e12).
    #[arg(long, requires = "dry_run")]
    pub tokens: Option<f64>,
    /// Print JSON instead of a table.
    #[arg(long, requires = "dry_run")]
    pub json: bool,
}

fn billions(x: f64) -> String {
    if x >= 1e9 {
        format!("{:.2}B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else {
        format!("{x:.0}")
    }
}

pub(crate) fn gib(bytes: f64) -> String {
    let units = [("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (name, shift) in units {
        let unit = (1u64 << shift) as f64;
        if bytes >= unit {
            return format!("{:.2} {name}", bytes / unit);
        }
    }
    format!("{bytes:.0} B")
}

pub(crate) fn secs(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.3} s")
    } else if s >= 1e-3 {
        format!("{:.3} ms", s * 1e3)
    } else {
        format!("{:.3} us", s * 1e6)
    }
}

/// Runs the dry run; a bad flag is a `UsageError` that names it.
pub fn run(recipe: &Recipe, args: &DryRunArgs) -> anyhow::Result<()> {
    let cluster = cluster(recipe, args)?;
    let plan = Plan::of(recipe, &cluster);
    let days = args.tokens.map(|t| plan.days_at(t, plan.time.trainer_s));
    if args.json {
        let mut v = serde_json::to_value(&plan)?;
        v["cluster"] = serde_json::to_value(&cluster)?;
        v["recipe"] = recipe.name.clone().into();
        if let (Some(t), Some(d)) = (args.tokens, days) {
            v["train_tokens"] = t.into();
            v["train_days"] = d.into();
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{}: dry run (nothing allocated)", recipe.name);
    print_params(recipe, &plan);
    print_memory(recipe, &plan, &cluster);
    print_comm(&plan);
    print_time(&plan, &cluster, args.tokens, days);
    Ok(())
}

/// The accelerator `--gpu NAME` names; an unknown one is a usage error listing the table.
pub(crate) fn gpu_flag(name: &str) -> Result<Gpu, UsageError> {
    gpu_by_name(name).ok_or_else(|| {
        let names: Vec<&str> = GPUS.iter().map(|g| g.name).collect();
        UsageError::new(format!(
            "--gpu {name}: not in the device table; use one of {}",
            names.join(", ")
        ))
    })
}

/// The cluster the flags describe, checked against the recipe's layout.
fn cluster(recipe: &Recipe, args: &DryRunArgs) -> Result<Cluster, UsageError> {
    let gpu = gpu_flag(&args.gpu)?;
    if !(args.mfu > 0.0 && args.mfu <= 1.0) {
        return Err(UsageError::new(format!(
            "--mfu {}: use a fraction in (0, 1]",
            args.mfu
        )));
    }
    if args.link_gbps.is_nan() || args.link_gbps <= 0.0 {
        return Err(UsageError::new(format!(
            "--link-gbps {}: use a positive bandwidth",
            args.link_gbps
        )));
    }
    let ep = recipe.parallel.expert.max(1);
    let world = args.world.unwrap_or(recipe.parallel.data.max(1) * ep);
    if world == 0 || !world.is_multiple_of(ep) {
        return Err(UsageError::new(format!(
            "--world {world}: not a multiple of parallel.expert = {ep}; use a multiple of {ep}"
        )));
    }
    if recipe.parallel.data > 0 && recipe.parallel.data * ep != world {
        return Err(UsageError::new(format!(
            "--world {world}: the recipe fixes parallel.data = {} x parallel.expert = {ep} = {} ranks; \
             pass --world {} or set parallel.data: 0",
            recipe.parallel.data,
            recipe.parallel.data * ep,
            recipe.parallel.data * ep
        )));
    }
    Ok(Cluster {
        gpu,
        gpus: world,
        link_gbps: args.link_gbps,
        mfu: args.mfu,
    })
}

/// Parameters: total, experts, embedding, MTP, and activated per token with FLOPs.
fn print_params(recipe: &Recipe, plan: &Plan) {
    let m = &recipe.model;
    let p = &plan.params;
    println!("parameters");
    println!(
        "  total                          {:>12}  ({} exactly)",
        billions(p.total as f64),
        p.total
    );
    println!(
        "  routed experts                 {:>12}  ({} layers x {} x {})",
        billions(p.experts_all as f64),
        m.num_layers,
        m.n_routed_experts,
        billions(p.expert as f64)
    );
    println!(
        "  embedding                      {:>12}",
        billions(p.embedding as f64)
    );
    if p.mtp > 0 {
        println!(
            "  MTP layer                      {:>12}  (not in the activated counts)",
            billions(p.mtp as f64)
        );
    }
    let names = [
        "0",
        &format!("K_e = {}", m.target_ffn_experts()),
        &format!("K = {}", m.moe_topk),
    ];
    for (i, name) in names.iter().enumerate() {
        println!(
            "  activated per token, {:<9} {:>12}  {:>10.3e} training FLOPs/token",
            format!("{name}:"),
            billions(plan.activated[i]),
            plan.flops_per_token[i]
        );
    }
}

/// Memory per rank against the GPU's.
fn print_memory(recipe: &Recipe, plan: &Plan, cluster: &Cluster) {
    let (world, gpu) = (cluster.gpus, cluster.gpu);
    let ep = recipe.parallel.expert.max(1);
    let mem = &plan.memory;
    println!(
        "memory per rank ({} ranks = {} data x {} expert; {} parameters held)",
        world,
        world / ep,
        ep,
        billions(mem.params as f64)
    );
    println!(
        "  weights (fp32)                 {:>12}{}",
        gib(mem.weights),
        match recipe.parallel.shard {
            catapult_trainer::recipe::ShardMode::Parameters => {
                "  (1/P slices, plus gather buffers: the ends and two layers)"
            }
            _ => "",
        }
    );
    println!(
        "  gradients (fp32)               {:>12}{}",
        gib(mem.gradients),
        match recipe.parallel.shard {
            catapult_trainer::recipe::ShardMode::Gradients
            | catapult_trainer::recipe::ShardMode::Parameters => {
                let full = mem.total
                    - mem.weights
                    - mem.gradients
                    - mem.optimizer
                    - mem.activations
                    - mem.partials;
                match full > 0.0 {
                    true => format!(
                        "  (reduced slices; the total adds {} of full gradients held \
                         across micro-batches)",
                        gib(full)
                    ),
                    false => {
                        "  (reduced slices; full ones exist per layer during backward)".to_string()
                    }
                }
            }
            _ => String::new(),
        }
    );
    println!(
        "  AdamW moments (fp32)           {:>12}{}",
        gib(mem.optimizer),
        match recipe.parallel.shard {
            catapult_trainer::recipe::ShardMode::None => String::new(),
            mode => format!(
                "  (parallel.shard: {}: dense 1/{world}, experts 1/{})",
                mode.name(),
                world / ep
            ),
        }
    );
    println!(
        "  activations (estimate, {}; micro-batch {} x {} tokens) {}",
        match recipe.train.recompute {
            catapult_trainer::recipe::Recompute::None => "no recomputation",
            catapult_trainer::recipe::Recompute::Layer => "train.recompute: layer",
        },
        recipe.train.micro_batch_size,
        recipe.data.max_seq_len(),
        gib(mem.activations)
    );
    if mem.partials > 0.0 {
        println!(
            "  reduction tree partials (fp32) {:>12}  (partial sums of micro-batch gradients; \
             parallel.reduction: ranks holds none)",
            gib(mem.partials)
        );
    }
    let fits = mem.total <= gpu.memory_gib * (1u64 << 30) as f64;
    println!(
        "  total                          {:>12}  ({} a {} GiB {})",
        gib(mem.total),
        if fits { "fits" } else { "does NOT fit" },
        gpu.memory_gib,
        gpu.name
    );
    if !fits {
        match recipe.parallel.shard {
            catapult_trainer::recipe::ShardMode::Parameters => {
                println!("    lower the micro-batch, set train.recompute: layer, or add ranks")
            }
            _ => println!(
                "    dense parameters are replicated on every rank: parallel.shard: parameters \
                 keeps 1/P of them"
            ),
        }
    }
}

/// Bytes each rank exchanges per step.
fn print_comm(plan: &Plan) {
    let c = &plan.comm;
    println!("communication per rank per step");
    println!("  MoE all-to-all                 {:>12}", gib(c.all_to_all));
    println!(
        "  dense gradient sum             {:>12}",
        gib(c.dense_gradients)
    );
    println!(
        "  expert gradient sum            {:>12}",
        gib(c.expert_gradients)
    );
    if c.param_gathers > 0.0 {
        println!(
            "  parameter gathers              {:>12}  (per layer, forward and backward)",
            gib(c.param_gathers)
        );
    }
}

/// The step-time estimate, and the days for `tokens`.
fn print_time(plan: &Plan, cluster: &Cluster, tokens: Option<f64>, days: Option<f64>) {
    let (world, gpu) = (cluster.gpus, cluster.gpu);
    let t = &plan.time;
    println!(
        "step on {} x {} ({} TFLOP/s at MFU {}, {} GB/s links), {} tokens per step",
        world, gpu.name, gpu.peak_tflops, cluster.mfu, cluster.link_gbps, t.tokens_per_step
    );
    println!("  compute                        {:>12}", secs(t.compute_s));
    println!(
        "  all-to-all                     {:>12}",
        secs(t.all_to_all_s)
    );
    println!(
        "  gradient sums{}{:>12}",
        match plan.comm.param_gathers > 0.0 {
            true => " and gathers     ",
            false => "                  ",
        },
        secs(t.reduction_s)
    );
    println!(
        "  step (all-to-all overlapped)   {:>12}",
        secs(t.overlapped_s)
    );
    println!("  step (nothing overlapped)      {:>12}", secs(t.serial_s));
    println!("  step (everything overlapped)   {:>12}", secs(t.hidden_s));
    println!("  step (as the trainer overlaps) {:>12}", secs(t.trainer_s));
    if let (Some(tokens), Some(d)) = (tokens, days) {
        let steps = tokens / t.tokens_per_step;
        println!(
            "{tokens:.3e} tokens ({steps:.0} steps): {d:.1} days as the trainer overlaps; {:.1} \
             days (all-to-all overlapped), {:.1} days (everything overlapped), {:.1} days \
             (compute alone)",
            steps * t.overlapped_s / 86_400.0,
            steps * t.hidden_s / 86_400.0,
            steps * t.compute_s / 86_400.0
        );
    }
}
