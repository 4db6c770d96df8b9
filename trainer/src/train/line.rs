//! The metrics lines a step writes to `metrics.jsonl` (and TensorBoard): the step line
//! (loss, learning rates, throughput, MFU, memory, all-to-all costs), the router line
//! (FFN experts per token per layer, expert loads, R_g, similarity) and the checkpoint
//! line. It computes no training state; the all-to-all totals are summed over ranks here.

use super::step::StepStats;
use crate::groups::Group;
use crate::model::LongcatModel;
use crate::recipe::Recipe;
use crate::router_metrics::{expert_loads, load_spread, router_similarity};
use catapult_kernels::comm::Comm;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// What one finished step reports.
pub struct StepReport<'a> {
    /// Steps done (1-based).
    pub done: usize,
    /// The step's learning rate (before group factors).
    pub lr: f64,
    /// The gradient norm before clipping.
    pub grad_norm: f64,
    /// The step's statistics, reduced over ranks.
    pub stats: &'a StepStats,
    /// Micro-batches per rank.
    pub micro_batches: usize,
    /// Tokens per second of the step (global batch).
    pub tokens_per_s: f64,
    /// Tokens seen so far.
    pub tokens: u64,
    /// The batch's sequence length and data phase.
    pub seq_len: usize,
    /// The batch's data phase.
    pub phase: usize,
    /// Seconds the step waited for its batch.
    pub data_wait_s: f64,
    /// Seconds of the step.
    pub step_s: f64,
    /// Seconds since the run (or resumed run) started.
    pub elapsed_s: f64,
    /// FFN experts per token, per layer.
    pub per_layer: &'a [f64],
    /// Seconds of the silent-data-corruption replay, when one ran.
    pub sdc_check_s: Option<f64>,
    /// Bytes this rank holds in parameters, gradients and optimizer state.
    pub held: [u64; 3],
    /// Seconds of the gradient reduction and of gathering parameter slices (after the
    /// update with sharded optimizer state; per layer with sharded parameters), both
    /// outside any overlap.
    pub exposed_s: [f64; 2],
    /// Bytes this rank sent reducing gradients and received gathering sharded
    /// parameters (`parallel.shard: parameters`) this step.
    pub moved_bytes: [u64; 2],
    /// Seconds of this rank's step by phase: the micro-batches' forward and backward
    /// passes, the statistics' reduction over ranks, and the update (what is left of
    /// the gradient reduction, the norm, clipping, AdamW, the parameter gather).
    pub phase_s: [f64; 3],
}

impl StepReport<'_> {
    /// FFN experts per token over every layer.
    pub fn overall(&self) -> f64 {
        self.per_layer.iter().sum::<f64>() / self.per_layer.len() as f64
    }

    /// The step's mean next-token loss.
    pub fn loss(&self) -> f64 {
        self.stats.lm_loss / self.micro_batches as f64
    }
}

/// The step line; every rank calls it (the exchange totals are summed over `world`).
pub fn step_line(
    r: &StepReport,
    recipe: &Recipe,
    world: &Comm,
    peak_tflops: Option<f64>,
    lr_scales: &BTreeMap<Group, f64>,
) -> Value {
    let exchange = &r.stats.exchange;
    // Exchange volume summed over ranks, exposed time averaged over ranks.
    let mut volume = [
        exchange[0].bytes + exchange[1].bytes,
        exchange[0].bytes_remote + exchange[1].bytes_remote,
    ];
    world.all_reduce_sum(&mut volume);
    let mut exposed = [exchange[0].exposed_s, exchange[1].exposed_s];
    world.all_reduce_sum(&mut exposed);
    let exposed = exposed.map(|e| e / world.size() as f64);
    let micro = r.micro_batches as f64;
    let mut line = json!({
        "step": r.done,
        "loss": r.loss(),
        "lr": r.lr,
        "grad_norm": r.grad_norm,
        "tokens_per_s": r.tokens_per_s,
        "tokens": r.tokens,
        "seq_len": r.seq_len,
        "data_phase": r.phase,
        "data_wait_s": r.data_wait_s,
        "ffn_experts_per_token": r.overall(),
        "ffn_experts_per_token_per_layer": r.per_layer,
        "load_balance_loss": r.stats.balance_loss / micro,
        "z_loss": r.stats.z_loss / micro,
        "mtp_loss": r.stats.mtp_loss / micro,
        "step_s": r.step_s,
        "forward_backward_s": r.phase_s[0],
        "stats_reduce_s": r.phase_s[1],
        "update_s": r.phase_s[2],
        "all_to_all_exposed_s": exposed[0] + exposed[1],
        "all_to_all_forward_exposed_s": exposed[0],
        "all_to_all_backward_exposed_s": exposed[1],
        "all_to_all_bytes": volume[0],
        "all_to_all_remote_bytes": volume[1],
        "elapsed_s": r.elapsed_s,
        "param_bytes": r.held[0],
        "grad_bytes": r.held[1],
        "optimizer_bytes": r.held[2],
        "grad_reduce_exposed_s": r.exposed_s[0],
        "grad_reduce_bytes": r.moved_bytes[0],
        "param_gather_exposed_s": r.exposed_s[1],
        "param_gather_bytes": r.moved_bytes[1],
    });
    // Model FLOPs of the experts actually activated, per rank, against the peak.
    let flops = crate::sizing::flops_per_token(&recipe.model, r.seq_len, r.per_layer);
    let (achieved, mfu) = crate::sizing::mfu(flops, r.tokens_per_s, world.size(), peak_tflops);
    line["model_flops_per_token"] = flops.into();
    line["achieved_tflops"] = achieved.into();
    if let Some(mfu) = mfu {
        line["mfu"] = mfu.into();
    }
    if let Some((rss, peak)) = crate::device::memory_bytes() {
        line["memory_rss_bytes"] = rss.into();
        line["memory_peak_rss_bytes"] = peak.into();
    }
    for (group, scale) in lr_scales {
        line[format!("lr_{group}")] = (r.lr * scale).into();
    }
    if let Some(replay_s) = r.sdc_check_s {
        line["sdc_check_s"] = replay_s.into();
        line["sdc_check_fraction"] = (replay_s / r.step_s).into();
    }
    line
}

/// The router line (every `moe.metrics_every` steps and at the end).
pub fn router_line(
    r: &StepReport,
    recipe: &Recipe,
    counts: &[Vec<i64>],
    model: &LongcatModel,
    param_count: i64,
    bias_ki: f64,
) -> Value {
    let n = recipe.model.n_routed_experts;
    let (load_min, load_max, load_cv) = load_spread(counts, n);
    let similarity = model
        .layers
        .iter()
        .map(|l| router_similarity(&l.moe.router))
        .sum::<f64>()
        / model.layers.len() as f64;
    let grad_rms = r.grad_norm / (param_count as f64).sqrt();
    json!({
        "step": r.done,
        "router": {
            "ffn_experts_per_token": r.overall(),
            "ffn_experts_per_token_per_layer": r.per_layer,
            "target_ffn_experts": recipe.model.target_ffn_experts(),
            "expert_load_min": load_min,
            "expert_load_max": load_max,
            "expert_load_cv": load_cv,
            "expert_load_per_layer": expert_loads(counts, n),
            "gradient_ratio_rg": r.stats.gradient_ratio,
            "router_cosine_similarity": similarity,
            "hidden_rms": r.stats.hidden_rms,
            "grad_rms": grad_rms,
            "adam_eps": recipe.train.adam_eps,
            "bias_ki": bias_ki,
        }
    })
}

/// Average number of FFN experts per token, per layer.
pub fn ffn_experts_per_token(counts: &[Vec<i64>], n_ffn: usize, tokens: i64) -> Vec<f64> {
    counts
        .iter()
        .map(|layer| layer[..n_ffn].iter().sum::<i64>() as f64 / tokens as f64)
        .collect()
}
