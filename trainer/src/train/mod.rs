//! The training loop, visibly: get batch -> micro-steps -> reduce -> clip -> optimizer
//! step -> expert-bias update -> log -> evaluate -> checkpoint (`Trainer::run`).
//!
//! The loop composes pieces that each own their state and live in their own rooms:
//! the model (`init`, `model`), the mesh and its schedule (`parallel`), `AdamW`, the
//! expert-bias controller, the data pipeline, checkpoints (`checkpoint`), supervision
//! (`supervision`). Here: opening a run (`open`), one step's micro-batches (`step`), the
//! silent-data-corruption replay (`sdc`), the metrics lines (`line`), validation
//! (`eval`), saving (`save`) and growth schedules (`stages`).

mod eval;
mod line;
mod open;
mod save;
mod sdc;
mod stages;
mod step;

use crate::bias_control::ExpertBiasController;
use crate::checkpoint::{LoadPolicy, Restorable, Resume};
use crate::error::TrainError;
use crate::groups::Group;
use crate::init::BuiltModel;
use crate::metrics::{Metrics, Progress};
use crate::optim::{learning_rate, AdamW};
use crate::parallel::{is_expert_param, reduce::reduce_gradients, Parallel};
use crate::recipe::{Backend, Recipe};
use crate::supervision::{self, Heartbeat};
use catapult_checkpoints::{AsyncSaver, Checkpoints, Loaded};
use catapult_data::{Batch, Pipeline};
use catapult_kernels::comm::Comm;
use eval::ValidationSets;
use line::StepReport;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;
use step::{MicroBatch, StepContext, StepStats};
use tch::Device;

/// How `train` behaves beyond the recipe.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Replace an existing run directory's outputs instead of refusing.
    pub overwrite: bool,
    /// Continue from a checkpoint.
    pub resume: Option<Resume>,
    /// Skip the BLAKE3 check of checkpoint files on load.
    pub no_verify: bool,
    /// Fail instead of falling back to an earlier checkpoint when the newest is broken.
    pub no_fallback: bool,
}

impl RunOptions {
    /// How checkpoints are read.
    pub fn load_policy(&self) -> LoadPolicy {
        LoadPolicy {
            verify: !self.no_verify,
            fallback: !self.no_fallback,
        }
    }
}

/// Where a finished run put its outputs.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The final checkpoint directory.
    pub checkpoint: PathBuf,
    /// The JSON-lines metrics file.
    pub metrics: PathBuf,
    /// Validation loss before the first step.
    pub first_val_loss: f64,
    /// Validation loss after the last step.
    pub last_val_loss: f64,
    /// This process's rank (only rank 0 writes the run directory).
    pub rank: usize,
    /// The run stopped early on a preemption request, after saving a checkpoint at this
    /// step (None: it ran to the end).
    pub preempted_at: Option<usize>,
    /// The stop was the first stage of a growth schedule reaching its token count.
    pub reached_tokens: bool,
}

/// Trains `recipe` to the end and writes the run directory.
pub fn train(recipe: &Recipe, opts: &RunOptions) -> Result<RunSummary, TrainError> {
    let device = crate::device::device_for(recipe)?;
    if recipe.system.threads > 0 {
        tch::set_num_threads(recipe.system.threads as i32);
    }
    // The MPI world (or a world of one), split into expert-parallel groups: every rank
    // reads its own slice of each global batch and holds the dense parameters and its
    // group's share of the experts.
    let p = &recipe.parallel;
    let nccl = match (p.backend, device) {
        (Backend::Nccl, _) | (Backend::Auto, Device::Cuda(_)) => Some(device),
        _ => None,
    };
    let world = Comm::from_env().fast_reductions(p.fast_reductions);
    let par = Parallel::with_nccl(world, p.expert, p.data, p.overlap, nccl).map_err(|source| {
        TrainError::Layout {
            recipe: recipe.name.clone(),
            source,
        }
    })?;
    if recipe.growth.is_some() {
        stages::train_growing(recipe, opts, &par, device)
    } else {
        train_stage(recipe, opts, &par, device, None)
    }
}

/// Trains `recipe` on `par` to the end, or until `stop_at_tokens` (then like a
/// preemption: a checkpoint at that step, `reached_tokens` set).
fn train_stage(
    recipe: &Recipe,
    opts: &RunOptions,
    par: &Parallel,
    device: Device,
    stop_at_tokens: Option<u64>,
) -> Result<RunSummary, TrainError> {
    let mut trainer = Trainer::open(recipe, opts, par, device, stop_at_tokens)?;
    trainer.run()?;
    trainer.finish()
}

/// Why the loop stopped before the last step.
#[derive(Debug, Clone, Copy)]
struct Stop {
    /// The step whose checkpoint was written.
    at: usize,
    /// The first stage of a growth schedule reached its token count.
    reached_tokens: bool,
}

/// A run in progress: every piece the loop composes, and where it is.
struct Trainer<'a> {
    recipe: &'a Recipe,
    opts: &'a RunOptions,
    par: &'a Parallel,
    device: Device,
    run_dir: PathBuf,
    built: BuiltModel,
    optimizer: AdamW,
    controller: ExpertBiasController,
    pipeline: Pipeline,
    valid: ValidationSets,
    store: Checkpoints,
    saver: AsyncSaver,
    metrics: Metrics,
    progress: Progress,
    heartbeat: Heartbeat,
    /// Each parameter group's learning rate relative to the schedule (width transfer).
    lr_scales: BTreeMap<Group, f64>,
    peak_tflops: Option<f64>,
    param_count: i64,
    /// Optimizer steps done.
    step: usize,
    tokens_seen: u64,
    data_wait_s: f64,
    /// Rollbacks after a silent-data-corruption check, in a row (reset by a clean check).
    rollbacks: usize,
    first_val_loss: f64,
    last_val_loss: f64,
    stop_at_tokens: Option<u64>,
    stopped: Option<Stop>,
    started: Instant,
}

impl Trainer<'_> {
    /// The loop: each iteration is one optimizer step over the global batch.
    fn run(&mut self) -> Result<(), TrainError> {
        let recipe = self.recipe;
        let t = &recipe.train;
        while self.step < t.steps && self.stopped.is_none() {
            let step = self.step;
            let done = step + 1;
            // The torch RNG is a function of (seed, step), so a resumed run draws the
            // same numbers as an uninterrupted one.
            tch::manual_seed(self.recipe.seed as i64 ^ ((step as i64) << 20));
            let step_start = Instant::now();
            supervision::fault_hook(self.rank(), done);
            let lr = learning_rate(t, step);

            // Get batch: this rank's slice of the global batch.
            let wait_start = Instant::now();
            let batch: Batch = self.pipeline.next_batch()?;
            let waited = wait_start.elapsed().as_secs_f64();
            self.data_wait_s += waited;

            // Micro-steps: forward and backward of each micro-batch, gradients
            // accumulating; the first replayed when a corruption check is due.
            let (mut stats, replay) = self.micro_steps(&batch, step, done);
            if let Some(replay) = &replay {
                if self.settle_replay(replay, done)? {
                    continue;
                }
            }

            // Reduce: dense gradients over the world, expert gradients over replicas.
            reduce_gradients(self.par, self.optimizer.parameters());
            stats.all_reduce(&self.par.world);

            // Clip (the experts' squared norm summed over the expert group), then step.
            let grad_norm = self.clip_gradients();
            self.optimizer.step(lr);

            // Expert-bias update from the global batch's counts: the same on every rank.
            let counts = stats.count_rows();
            let bias = self.controller.update(&counts, stats.tokens);
            self.built.set_expert_bias(bias);

            // Log.
            let step_tokens = (t.global_batch_size * batch.seq_len) as u64;
            self.tokens_seen += step_tokens;
            let step_s = step_start.elapsed().as_secs_f64();
            let n_ffn = self.recipe.model.n_routed_experts;
            let per_layer = line::ffn_experts_per_token(&counts, n_ffn, stats.tokens);
            let report = StepReport {
                done,
                lr,
                grad_norm,
                stats: &stats,
                micro_batches: self.micro_batches(),
                tokens_per_s: step_tokens as f64 / step_s,
                tokens: self.tokens_seen,
                seq_len: batch.seq_len,
                phase: batch.phase,
                data_wait_s: waited,
                step_s,
                elapsed_s: self.started.elapsed().as_secs_f64(),
                per_layer: &per_layer,
                sdc_check_s: replay.as_ref().map(|r| r.seconds),
            };
            self.log(&report, &counts)?;

            // Evaluate.
            if done.is_multiple_of(t.eval_every) || done == t.steps {
                self.evaluate(done)?;
            }
            self.progress.step(
                done,
                &format!(
                    "loss {:.4} | {:.0} tok/s | val {:.4} | ffn/tok {:.2}",
                    report.loss(),
                    report.tokens_per_s,
                    self.last_val_loss,
                    report.overall()
                ),
            );

            // Checkpoint (also when a stop was requested or the token count reached).
            self.check_stop(done);
            self.checkpoint(done)?;
            catapult_checkpoints::kill_self_on(&format!("step:{done}"));
            self.step += 1;
            self.heartbeat.beat(self.step);
        }
        Ok(())
    }

    fn rank(&self) -> usize {
        self.par.world.rank()
    }

    fn lead(&self) -> bool {
        self.rank() == 0
    }

    /// Micro-batches per step on each rank.
    fn micro_batches(&self) -> usize {
        let t = &self.recipe.train;
        t.global_batch_size / self.par.world.size() / t.micro_batch_size
    }

    /// The forward and backward passes of this rank's micro-batches of `batch`; with a
    /// corruption check due, the first is replayed and compared.
    fn micro_steps(&mut self, batch: &Batch, step: usize, done: usize) -> (StepStats, Option<sdc::Replay>) {
        let recipe = self.recipe;
        let t = &recipe.train;
        let router_metrics_due = done.is_multiple_of(recipe.moe.metrics_every) || done == t.steps;
        let sdc_due = t.sdc_check_every > 0 && done.is_multiple_of(t.sdc_check_every);
        let cx = StepContext {
            model: &self.built.model,
            recipe,
            par: self.par,
            shape: step::balance_shape(recipe),
            micro_batches: self.micro_batches(),
        };
        let segments = recipe.data.mask_documents.then(|| batch.segment_ids());
        let mut stats = StepStats::new(recipe, self.device, step);
        let mut replay = None;
        for micro in 0..cx.micro_batches {
            let input = MicroBatch::of(batch, segments.as_deref(), micro, t.micro_batch_size, self.device);
            step::micro_step(&cx, &input, router_metrics_due && micro == 0, &mut stats);
            if micro == 0 && sdc_due {
                let scratch = StepStats::new(recipe, self.device, step);
                let rank = self.par.world.rank();
                replay = Some(sdc::replay(&cx, &input, &mut self.optimizer, scratch, rank, done));
            }
        }
        (stats, replay)
    }

    /// Clips the gradients to `train.grad_clip`; returns the norm before clipping.
    fn clip_gradients(&mut self) -> f64 {
        let expert = &self.par.expert;
        self.optimizer
            .clip_grad_norm_sharded(self.recipe.train.grad_clip, is_expert_param, |x| {
                let mut v = [x];
                expert.all_reduce_sum(&mut v);
                v[0]
            })
    }

    /// Writes the step line (every `train.log_every` steps and at the end) and the
    /// router line (every `moe.metrics_every` steps and at the end).
    fn log(&mut self, report: &StepReport, counts: &[Vec<i64>]) -> Result<(), TrainError> {
        let (done, recipe) = (report.done, self.recipe);
        let t = &recipe.train;
        if done.is_multiple_of(t.log_every) || done == t.steps {
            let world = &self.par.world;
            let line = line::step_line(report, recipe, world, self.peak_tflops, &self.lr_scales);
            self.metrics.write(line)?;
        }
        if done.is_multiple_of(recipe.moe.metrics_every) || done == t.steps {
            let ki = self.controller.ki();
            let line = line::router_line(report, recipe, counts, &self.built.model, self.param_count, ki);
            self.metrics.write(line)?;
            let rg = report.stats.gradient_ratio;
            if rg >= 0.1 {
                self.progress.println(format!(
                    "warning: step {done}: R_g = {rg:.3} >= 0.1: the load-balance loss dominates the \
                     router's gradient; lower moe.load_balance_coeff"
                ));
            }
        }
        Ok(())
    }

    /// The validation loss after `done` steps, written to the metrics.
    fn evaluate(&mut self, done: usize) -> Result<(), TrainError> {
        let micro = self.recipe.train.micro_batch_size;
        let (loss, line) = eval::validate(&self.built.model, self.par, &self.valid, micro, self.device, done);
        self.last_val_loss = loss;
        self.metrics.write(line)
    }

    /// A stop request on any rank stops every rank after this step, with a checkpoint;
    /// so does the first stage of a growth schedule reaching its token count.
    fn check_stop(&mut self, done: usize) {
        let mut stop = [i32::from(supervision::stop_requested())];
        self.par.world.all_reduce_sum(&mut stop);
        if stop[0] > 0 {
            self.stopped = Some(Stop {
                at: done,
                reached_tokens: false,
            });
        }
        if self.stop_at_tokens.is_some_and(|n| self.tokens_seen >= n) {
            self.stopped = Some(Stop {
                at: done,
                reached_tokens: true,
            });
        }
    }

    /// Puts `loaded` into the model, optimizer, controller and pipeline.
    fn restore(&mut self, loaded: &Loaded) -> Result<(), TrainError> {
        Restorable {
            par: self.par,
            built: &self.built,
            optimizer: &mut self.optimizer,
            controller: &mut self.controller,
            pipeline: &mut self.pipeline,
        }
        .restore(loaded)
    }
}

/// Makes every rank return an error when any rank's `result` is one (so no rank waits
/// forever in a collective for a rank that stopped); the error says whether a failed
/// rank's problem was bad input.
fn agree(comm: &Comm, result: Result<(), TrainError>) -> Result<(), TrainError> {
    let code = match &result {
        Ok(()) => 0,
        Err(e) if e.is_bad_input() => 2,
        Err(_) => 1,
    };
    let (codes, _) = comm.all_gather_v(&[code]);
    let failed: Vec<String> = (0..codes.len())
        .filter(|&r| codes[r] != 0)
        .map(|r| r.to_string())
        .collect();
    match result {
        Err(e) => Err(e),
        Ok(()) if !failed.is_empty() => Err(TrainError::Peer {
            ranks: failed.join(", "),
            bad_input: codes.contains(&2),
        }),
        Ok(()) => Ok(()),
    }
}
