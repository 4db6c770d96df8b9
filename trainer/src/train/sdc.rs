//! Silent-data-corruption checks (longcat-methods section 9): every
//! `train.sdc_check_every` steps each rank replays its first micro-batch, and its
//! gradients must come out bit for bit the same. A rank that differs either stops the
//! run or rolls every rank back to the last checkpoint (`train.sdc_action`), at most
//! `MAX_ROLLBACKS` times in a row.

use super::step::{micro_step, MicroBatch, StepContext, StepStats};
use super::Trainer;
use crate::error::TrainError;
use crate::optim::AdamW;
use crate::parallel::is_expert_param;
use crate::recipe::SdcAction;
use catapult_kernels::comm::Comm;
use std::time::Instant;
use tch::Tensor;

/// Rollbacks after failed checks, in a row, before giving up.
const MAX_ROLLBACKS: usize = 3;

/// A replay's outcome on this rank.
pub struct Replay {
    /// Seconds the replay took.
    pub seconds: f64,
    /// The first tensor whose gradient differed, if any.
    pub differs: Option<String>,
}

/// Replays `batch` (the micro-batch just run; its gradients are in the parameters) and
/// compares: afterwards the parameters hold the replay's gradients.
pub fn replay(cx: &StepContext, batch: &MicroBatch, optimizer: &mut AdamW, scratch: StepStats, rank: usize, done: usize) -> Replay {
    let started = Instant::now();
    let first = optimizer.gradients();
    optimizer.zero_grad();
    let mut scratch = scratch;
    micro_step(cx, batch, false, &mut scratch);
    fault_hook(rank, done, optimizer);
    let differs = first_difference(&first, &optimizer.gradients());
    Replay {
        seconds: started.elapsed().as_secs_f64(),
        differs,
    }
}

/// For the check: the first tensor whose gradient differs (in any bit) between two
/// computations, with the largest difference.
fn first_difference(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> Option<String> {
    if a.len() != b.len() {
        return Some(format!(
            "the set of gradients ({} tensors, then {})",
            a.len(),
            b.len()
        ));
    }
    for ((name, x), (_, y)) in a.iter().zip(b) {
        if !x.equal(y) {
            let diff = (x - y).abs().max().double_value(&[]);
            return Some(format!("{name} (max |difference| {diff:e})"));
        }
    }
    None
}

/// Test hook (`CATAPULT_FAULT=sdc:RANK:STEP`): on that rank and step, the replayed
/// gradients come out wrong, once per process, as a flaky unit would make them.
fn fault_hook(rank: usize, step: usize, optimizer: &AdamW) {
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let want = format!("sdc:{rank}:{step}");
    if std::env::var(crate::supervision::env::FAULT).is_ok_and(|f| f == want)
        && !FIRED.swap(true, std::sync::atomic::Ordering::SeqCst)
    {
        if let Some((_, p)) = optimizer.parameters().iter().find(|(n, _)| is_expert_param(n)) {
            tch::no_grad(|| {
                let g = p.grad();
                let _ = g.reshape([-1]).get(0).g_add_scalar_(1e-3);
            });
        }
    }
}

/// Every rank's result of its check, as "rank R: TENSOR" for the ranks that differ.
fn corrupted_ranks(comm: &Comm, differs: Option<&str>) -> Vec<String> {
    let mine = differs.unwrap_or("").as_bytes().to_vec();
    let (all, counts) = comm.all_gather_v(&mine);
    let mut out = Vec::new();
    let mut at = 0;
    for (r, c) in counts.into_iter().enumerate() {
        if c > 0 {
            out.push(format!(
                "rank {r}: {}",
                String::from_utf8_lossy(&all[at..at + c])
            ));
        }
        at += c;
    }
    out
}

impl Trainer<'_> {
    /// Settles a step's replay over every rank: Ok(false) when every rank agreed, Ok(true)
    /// after rolling back to the last checkpoint, an error when the run must stop.
    pub(super) fn settle_replay(&mut self, replay: &Replay, done: usize) -> Result<bool, TrainError> {
        let bad = corrupted_ranks(&self.par.world, replay.differs.as_deref());
        if bad.is_empty() {
            self.rollbacks = 0;
            return Ok(false);
        }
        let message = format!(
            "silent data corruption at step {done}: replaying the first micro-batch gave \
             different gradients on {}; the hardware of those ranks computes \
             unreliably: replace the node, or set train.sdc_action: rollback to retry \
             from the last checkpoint",
            bad.join("; ")
        );
        if self.recipe.train.sdc_action == SdcAction::Stop || self.rollbacks >= MAX_ROLLBACKS {
            return Err(TrainError::Corruption(message));
        }
        self.rollbacks += 1;
        self.progress.println(format!("warning: {message}; rolling back"));
        self.saver.wait()?;
        let policy = self.opts.load_policy();
        let loaded = self
            .store
            .load_newest(policy.verify, policy.fallback)?
            .ok_or_else(|| {
                TrainError::Corruption(format!(
                    "{message}; and no checkpoint under {} to roll back to",
                    self.store.root()
                ))
            })?;
        self.restore(&loaded)?;
        self.optimizer.zero_grad();
        self.step = loaded.manifest.step as usize;
        self.tokens_seen = loaded.manifest.tokens;
        self.metrics.close();
        if self.lead() {
            self.metrics = super::Metrics::resume(self.run_dir.join("metrics.jsonl"), self.step as u64)?.0;
            self.metrics.write(serde_json::json!({
                "step": self.step,
                "sdc_rollback": {"detected_at": done, "ranks": bad},
            }))?;
        }
        self.progress.set_position(self.step);
        Ok(true)
    }
}
