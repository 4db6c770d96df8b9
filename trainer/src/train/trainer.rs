//! A run in progress (`Trainer`): every piece the loop composes and where the run is,
//! and the loop itself, one optimizer step per iteration. Opening a run and saving are
//! the `open` and `save` rooms' methods on it.

use super::agree::agree;
use super::eval;
use super::line::{self, StepReport};
use super::options::{RunOptions, RunSummary};
use super::sdc;
use super::step::{self, MicroBatch, StepContext, StepStats};
use crate::bias_control::ExpertBiasController;
use crate::checkpoint::{quarantine_passed_over, Restorable};
use crate::error::TrainError;
use crate::groups::Group;
use crate::init::BuiltModel;
use crate::metrics::{Metrics, Progress};
use crate::optim::{learning_rate, AdamW};
use crate::parallel::{
    Gathering, GradReducer, Parallel, ParamGather, Segment, SegmentHooks, ShardPlan,
};
use crate::recipe::Recipe;
use crate::supervision::{self, Heartbeat};
use catapult_checkpoints::{AsyncSaver, Checkpoints, Loaded, ManifestHead};
use catapult_data::{Batch, Pipeline};
use catapult_kernels::CommError;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Tensor};

/// Trains `recipe` on `par` to the end, or until `stop_at_tokens` (then like a
/// preemption: a checkpoint at that step, `reached_tokens` set).
pub(super) fn train_stage(
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

/// What the non-finite guard did with a step.
pub(super) enum Guarded {
    /// Dropped: the loop goes on with the next step.
    Skipped,
    /// Rolled back to the last checkpoint.
    RolledBack,
}

/// Whether the optimizer's half of a step applied an update.
enum Stepped {
    /// It did.
    Applied(Update),
    /// Nothing was applied: the loss, the gradient norm (given) or the rate is not finite.
    NonFinite(f64),
}

/// What the optimizer's half of a step reports.
struct Update {
    /// The gradient norm before clipping.
    grad_norm: f64,
    /// Bytes held in parameters, gradients and moments just before the update.
    held: [u64; 3],
    /// Seconds of gradient reduction and of parameter gathering not overlapped.
    exposed_s: [f64; 2],
    /// Bytes this rank sent reducing gradients and received gathering parameters.
    moved_bytes: [u64; 2],
}

/// The hooks of a step with reductions: sharded parameters are gathered before each
/// segment's passes; a segment's freed gradients come back before its backward; with
/// `start`, its reduction starts after it.
struct Reducing<'a> {
    reducer: &'a mut GradReducer,
    gathering: Gathering<'a>,
    par: &'a Parallel,
    plan: &'a ShardPlan,
    params: &'a [(String, Tensor)],
    /// The micro-batch of this rank the passes are of.
    micro: usize,
    /// Whether its gradients are collected after each segment (not when a replay of
    /// it follows: that collects them all afterwards).
    collect: bool,
    start: bool,
}

impl SegmentHooks for Reducing<'_> {
    fn before_forward(&mut self, segment: Segment) -> Result<(), CommError> {
        self.gathering.before_forward(segment)
    }

    fn before(&mut self, segment: Segment) -> Result<(), CommError> {
        self.reducer.restore(segment, self.params);
        self.gathering.before(segment)
    }

    fn after(&mut self, segment: Segment) -> Result<(), CommError> {
        // First the working copies' gradients into their stand-ins, which the
        // reduction reads.
        self.gathering.after(segment)?;
        if self.collect {
            self.reducer.collect(segment, self.micro, self.params);
        }
        if self.start {
            self.reducer
                .start(segment, self.par, self.plan, self.params)?;
        }
        self.reducer.progress(self.plan, self.params);
        Ok(())
    }
}

/// Why the loop stopped before the last step.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stop {
    /// The step whose checkpoint was written.
    pub(super) at: usize,
    /// The first stage of a growth schedule reached its token count.
    pub(super) reached_tokens: bool,
}

/// The checkpoint being written: the background writer of this rank's files, the
/// manifest head of the checkpoint in flight, and the last save that failed.
#[derive(Default)]
pub(super) struct Saving {
    pub(super) saver: AsyncSaver,
    pub(super) pending: Option<ManifestHead>,
    pub(super) failed: Option<String>,
}

/// A run in progress: every piece the loop composes, and where it is.
pub(super) struct Trainer<'a> {
    pub(super) recipe: &'a Recipe,
    pub(super) opts: &'a RunOptions,
    pub(super) par: &'a Parallel,
    pub(super) device: Device,
    pub(super) run_dir: PathBuf,
    pub(super) built: BuiltModel,
    pub(super) optimizer: AdamW,
    /// Which slice of the replicated parameters this rank updates (`parallel.shard`).
    pub(super) shard: ShardPlan,
    /// The gradient reductions (a world of one too: the canonical tree and the norm).
    pub(super) reducer: GradReducer,
    /// The parameter slices and gather buffers (`parallel.shard: parameters`).
    pub(super) gather: Option<ParamGather>,
    pub(super) controller: ExpertBiasController,
    pub(super) pipeline: Pipeline,
    pub(super) valid: eval::ValidationSets,
    pub(super) store: Checkpoints,
    pub(super) saving: Saving,
    pub(super) metrics: Metrics,
    pub(super) progress: Progress,
    pub(super) heartbeat: Heartbeat,
    /// Each parameter group's learning rate relative to the schedule (width transfer).
    pub(super) lr_scales: BTreeMap<Group, f64>,
    pub(super) peak_tflops: Option<f64>,
    pub(super) param_count: i64,
    /// Optimizer steps done.
    pub(super) step: usize,
    pub(super) tokens_seen: u64,
    pub(super) data_wait_s: f64,
    /// Rollbacks after a silent-data-corruption check, in a row (reset by a clean check).
    pub(super) rollbacks: usize,
    /// The step a non-finite rollback last came from, and how many times in a row.
    pub(super) nonfinite_rollbacks: (usize, usize),
    pub(super) first_val_loss: f64,
    pub(super) last_val_loss: f64,
    pub(super) stop_at_tokens: Option<u64>,
    pub(super) stopped: Option<Stop>,
    pub(super) started: Instant,
    /// Seconds building and drawing the model took, and the peak RSS then.
    pub(super) init: (f64, Option<u64>),
}

impl Trainer<'_> {
    /// The loop: each iteration is one optimizer step over the global batch.
    pub(super) fn run(&mut self) -> Result<(), TrainError> {
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
            self.nan_fault_hook(done);
            let lr = learning_rate(t, step);

            // Get batch: this rank's slice of the global batch.
            let wait_start = Instant::now();
            let batch: Batch = self.pipeline.next_batch()?;
            let waited = wait_start.elapsed().as_secs_f64();
            self.data_wait_s += waited;

            // Micro-steps: forward and backward of each micro-batch, gradients
            // accumulating; the first replayed when a corruption check is due.
            let (steps, compute_s) = timed(|| self.micro_steps(&batch, step, done));
            let (mut stats, replay) = steps?;
            if let Some(replay) = &replay {
                let verdict =
                    sdc::verdict(&self.par.world, replay, done, t.sdc_action, self.rollbacks)?;
                if let sdc::Verdict::RollBack { message, ranks } = verdict {
                    self.rollbacks += 1;
                    self.roll_back(&message, done, ("sdc_rollback", ranks))?;
                    continue;
                }
                self.rollbacks = 0;
            }

            // Reduce (what backward did not overlap), clip, step, gather; nothing is
            // applied when the loss, the gradient norm or the rate is not finite.
            let ((), stats_s) = timed(|| stats.all_reduce(&self.par.world));
            let loss = stats.lm_loss + stats.balance_loss + stats.z_loss + stats.mtp_loss;
            let (stepped, update_s) = timed(|| self.update(lr, loss));
            let update = match stepped? {
                Stepped::Applied(u) => u,
                Stepped::NonFinite(grad_norm) => {
                    match self.nonfinite(done, (loss, grad_norm, lr))? {
                        Guarded::RolledBack => continue,
                        Guarded::Skipped => {
                            self.tokens_seen += (t.global_batch_size * batch.seq_len) as u64;
                            self.check_stop(done);
                            self.checkpoint(done)?;
                            self.step += 1;
                            self.heartbeat.beat(self.step);
                            continue;
                        }
                    }
                }
            };

            // Expert-bias update from the global batch's counts: the same on every rank.
            let counts = stats.count_rows();
            let bias = self
                .controller
                .update(&counts, stats.tokens, &stats.shift_rows());
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
                grad_norm: update.grad_norm,
                stats: &stats,
                micro_batches: self.micro_batches() * self.par.world.size(),
                tokens_per_s: step_tokens as f64 / step_s,
                tokens: self.tokens_seen,
                seq_len: batch.seq_len,
                phase: batch.phase,
                data_wait_s: waited,
                step_s,
                elapsed_s: self.started.elapsed().as_secs_f64(),
                per_layer: &per_layer,
                sdc_check_s: replay.as_ref().map(|r| r.seconds),
                held: update.held,
                exposed_s: update.exposed_s,
                moved_bytes: update.moved_bytes,
                phase_s: [compute_s, stats_s, update_s],
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

    pub(super) fn rank(&self) -> usize {
        self.par.world.rank()
    }

    pub(super) fn lead(&self) -> bool {
        self.rank() == 0
    }

    /// Micro-batches per step on each rank.
    pub(super) fn micro_batches(&self) -> usize {
        let t = &self.recipe.train;
        t.global_batch_size / self.par.world.size() / t.micro_batch_size
    }

    /// The forward and backward passes of this rank's micro-batches of `batch`; with a
    /// corruption check due, the first is replayed and compared.
    fn micro_steps(
        &mut self,
        batch: &Batch,
        step: usize,
        done: usize,
    ) -> Result<(StepStats, Option<sdc::Replay>), CommError> {
        let recipe = self.recipe;
        let t = &recipe.train;
        let router_metrics_due = done.is_multiple_of(recipe.moe.metrics_every) || done == t.steps;
        let sdc_due = t.sdc_check_every > 0 && done.is_multiple_of(t.sdc_check_every);
        let cx = StepContext {
            model: &self.built.model,
            recipe,
            par: self.par,
            shape: step::balance_shape(recipe),
            micro_batches: self.micro_batches() * self.par.world.size(),
        };
        let local = self.micro_batches();
        let segments = recipe.data.mask_documents.then(|| batch.segment_ids());
        let mut stats = StepStats::new(recipe, self.device, step);
        let mut replay = None;
        if let Some(g) = self.gather.as_mut() {
            // Gathers since the last step's (an evaluation's) are not this step's.
            g.end_step();
        }
        for micro in 0..local {
            let input = MicroBatch::of(
                batch,
                segments.as_deref(),
                micro,
                t.micro_batch_size,
                self.device,
            );
            // With overlap, the last micro-batch's backward starts each segment's
            // reduction as soon as its gradients are complete (not when a replay of it
            // follows).
            let replayed = micro == 0 && sdc_due;
            let start = self.par.overlap && micro + 1 == local && !replayed;
            let measure = router_metrics_due && micro == 0;
            let mut hooks = Reducing {
                reducer: &mut self.reducer,
                gathering: Gathering::new(self.gather.as_mut(), self.par, &self.shard),
                par: self.par,
                plan: &self.shard,
                params: self.optimizer.parameters(),
                micro,
                collect: !replayed,
                start,
            };
            step::micro_step(&cx, &input, measure, &mut stats, &mut hooks)?;
            if micro == 0 && sdc_due {
                let scratch = StepStats::new(recipe, self.device, step);
                let rank = self.par.world.rank();
                let mut gathering = Gathering::new(self.gather.as_mut(), self.par, &self.shard);
                replay = Some(sdc::replay(
                    &cx,
                    &input,
                    (&mut self.optimizer, &mut gathering),
                    scratch,
                    rank,
                    done,
                )?);
                self.reducer.collect_all(0, self.optimizer.parameters());
            }
        }
        Ok((stats, replay))
    }

    /// The optimizer's half of a step: the gradient reductions not yet done, clipping
    /// to `train.grad_clip`, the AdamW update and the gather of sharded parameters.
    fn update(&mut self, lr: f64, loss: f64) -> Result<Stepped, CommError> {
        let finite = |norm: f64| norm.is_finite() && loss.is_finite() && lr.is_finite();
        let reducer = &mut self.reducer;
        let (par, plan) = (self.par, &self.shard);
        let params = self.optimizer.parameters();
        reducer.finish(par, plan, params)?;
        // The experts' squared norm is summed over the expert group (each rank holds
        // its experts' share); the dense one is the same on every rank already.
        let (dense, experts) = reducer.squared_norms(par, plan);
        let mut v = [experts];
        par.expert.all_reduce_sum(&mut v);
        let grad_norm = (dense + v[0]).sqrt();
        if !finite(grad_norm) {
            return Ok(Stepped::NonFinite(grad_norm));
        }
        let max_norm = self.recipe.train.grad_clip;
        if max_norm > 0.0 && grad_norm > max_norm {
            reducer.scale(max_norm / (grad_norm + 1e-6));
        }
        reducer.write_back(par, plan, params)?;
        let mut held = self.optimizer.held_bytes();
        held[0] += self.gather.as_ref().map_or(0, ParamGather::held_bytes);
        held[1] += reducer.held_bytes();
        match plan.mode().keeps_gradient_slices() {
            true => {
                let grads: Vec<Option<Tensor>> = (0..params.len())
                    .map(|i| reducer.gradient(plan, params, i))
                    .collect();
                self.optimizer
                    .step_with(lr, |i| grads[i].as_ref().map(Tensor::shallow_clone));
            }
            false => self.optimizer.step(lr),
        }
        let (reduce_s, sent_bytes) = reducer.end_step();
        let gather_start = Instant::now();
        self.shard
            .gather_parameters(self.par, self.optimizer.parameters())?;
        let mut gather_s = gather_start.elapsed().as_secs_f64();
        let mut gathered_bytes = 0;
        if let Some(g) = self.gather.as_mut() {
            // The slices changed: every layer is gathered again when next computed.
            g.invalidate();
            (gather_s, gathered_bytes) = g.end_step();
        }
        Ok(Stepped::Applied(Update {
            grad_norm,
            held,
            exposed_s: [reduce_s, gather_s],
            moved_bytes: [sent_bytes, gathered_bytes],
        }))
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
            let mut line = line::router_line(
                report,
                recipe,
                counts,
                &self.built.model,
                self.param_count,
                ki,
            );
            if recipe.moe.bias_control.mode == crate::recipe::BiasMode::Hold {
                line["router"]["bias_hold_shift_per_layer"] =
                    self.controller.state().hold_shift.clone().into();
            }
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

    /// The validation loss after `step` steps and its metrics line (every rank computes).
    pub(super) fn validation(
        &mut self,
        step: usize,
    ) -> Result<(f64, serde_json::Value), CommError> {
        let micro = self.recipe.train.micro_batch_size;
        let mut gathering = Gathering::new(self.gather.as_mut(), self.par, &self.shard);
        eval::validate(
            (&self.built.model, self.par, &mut gathering),
            &self.valid,
            micro,
            self.device,
            step,
        )
    }

    /// The validation loss after `done` steps, written to the metrics.
    pub(super) fn evaluate(&mut self, done: usize) -> Result<(), TrainError> {
        let (loss, line) = self.validation(done)?;
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
    pub(super) fn restore(&mut self, loaded: &Loaded) -> Result<(), TrainError> {
        Restorable {
            par: self.par,
            built: &self.built,
            optimizer: &mut self.optimizer,
            sliced: self.gather.as_mut().map(|g| (g, &self.shard)),
            controller: &mut self.controller,
            pipeline: &mut self.pipeline,
        }
        .restore(loaded)
    }

    /// Restores every rank to the newest checkpoint after a failed corruption check at
    /// step `done` (`message` says what differed on which `ranks`), and rewinds the
    /// metrics to its step.
    pub(super) fn roll_back(
        &mut self,
        message: &str,
        done: usize,
        (key, ranks): (&str, Vec<String>),
    ) -> Result<(), TrainError> {
        self.progress
            .println(format!("warning: {message}; rolling back"));
        self.settle(true, done)?;
        let policy = self.opts.load_policy();
        let agreed = |p: Option<String>| crate::checkpoint::agree_on_problem(&self.par.world, p);
        let reader = catapult_checkpoints::Reader {
            verify: policy.verify,
            rank: self.rank(),
            world: self.par.world.size(),
            agree: &agreed,
        };
        let loaded = self
            .store
            .load_newest_as(&reader, policy.fallback)?
            .ok_or_else(|| {
                TrainError::Corruption(format!(
                    "{message}; and no checkpoint under {} to roll back to",
                    self.store.root()
                ))
            })?;
        // Every rank has read it before rank 0 moves the broken ones aside.
        agree(&self.par.world, Ok(()))?;
        let quarantined = match self.lead() {
            true => quarantine_passed_over(&self.store, &loaded),
            false => Ok(()),
        };
        agree(&self.par.world, quarantined)?;
        self.restore(&loaded)?;
        self.optimizer.zero_grad();
        self.step = loaded.manifest.step as usize;
        self.tokens_seen = loaded.manifest.tokens;
        self.metrics.close();
        if self.lead() {
            self.metrics = Metrics::resume(self.run_dir.join("metrics.jsonl"), self.step as u64)?.0;
            self.metrics.write(serde_json::json!({
                "step": self.step,
                key: {"detected_at": done, "ranks": ranks},
            }))?;
        }
        self.progress.set_position(self.step);
        Ok(())
    }
}

/// `f()` and the seconds it took.
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let start = Instant::now();
    let value = f();
    (value, start.elapsed().as_secs_f64())
}
