//! The non-finite guard: a step whose loss, gradient norm or learning rate is not finite
//! never reaches the weights. The three are global (the loss and the norm are summed
//! over every rank, the rate is the schedule's), so every rank takes the same branch:
//! `train.nonfinite: stop` ends the run (exit 1) naming the step, the lowest rank that
//! holds a non-finite tensor and its first one; `skip` drops the step (no update, the
//! batch consumed) on every rank alike; `rollback` reloads the last checkpoint, at most
//! `MAX_ROLLBACKS` times for the same step. A checkpoint is never written from
//! non-finite weights (`check_pieces`). Test hook: `CATAPULT_FAULT=nan:RANK:STEP[:always]`
//! puts a NaN into that rank's first gradient of step STEP (once, or every time).

use super::trainer::{Guarded, Trainer};
use crate::error::TrainError;
use crate::recipe::NonFiniteAction;
use catapult_checkpoints::{Dtype, RankState};
use tch::Tensor;

/// Rollbacks for the same failing step before the run stops.
pub const MAX_ROLLBACKS: usize = 3;

/// Whether a value is a problem, by name, for the message.
fn describe(loss: f64, grad_norm: f64, lr: f64) -> String {
    let mut bad = Vec::new();
    for (what, v) in [
        ("loss", loss),
        ("gradient norm", grad_norm),
        ("learning rate", lr),
    ] {
        if !v.is_finite() {
            bad.push(format!("{what} {v}"));
        }
    }
    bad.join(", ")
}

/// The first tensor (by name) of this rank that is not finite: a gradient, else a
/// weight.
fn first_nonfinite(params: &[(String, Tensor)]) -> Option<String> {
    let finite = |t: &Tensor| bool::try_from(t.isfinite().all()).unwrap_or(false);
    tch::no_grad(|| {
        let grad = params.iter().find(|(_, p)| {
            let g = p.grad();
            g.defined() && !finite(&g)
        });
        if let Some((n, _)) = grad {
            return Some(format!("the gradient of {n}"));
        }
        (params.iter())
            .find(|(_, p)| !finite(p))
            .map(|(n, _)| format!("the weights {n}"))
    })
}

/// Whether the `nan:` hook fired in this process (it fires once unless `:always`).
static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Test hook: `nan:RANK:STEP` fills this rank's first defined gradient of step STEP with
/// NaN, once per process (a transient fault); `nan:RANK:STEP:always` every time.
fn fault_hook(rank: usize, step: usize, params: &[(String, Tensor)]) {
    use std::sync::atomic::Ordering;
    let Ok(fault) = std::env::var(crate::supervision::env::FAULT) else {
        return;
    };
    let spec = format!("nan:{rank}:{step}");
    let armed =
        fault == format!("{spec}:always") || (fault == spec && !FIRED.swap(true, Ordering::SeqCst));
    if !armed {
        return;
    }
    if let Some((_, p)) = params.iter().find(|(_, p)| p.grad().defined()) {
        tch::no_grad(|| {
            let _ = p.grad().fill_(f64::NAN);
        });
    }
}

impl Trainer<'_> {
    /// The `nan:` test hook at the start of step `done`: the step's backward adds to the
    /// NaN, so it reaches the reductions and the gradient norm.
    pub(super) fn nan_fault_hook(&self, done: usize) {
        fault_hook(self.par.world.rank(), done, self.optimizer.parameters());
    }

    /// A step found non-finite values (`loss`, `grad_norm`, `lr`) after step `done`'s
    /// backward, before any update: stop, skip or roll back as the recipe says.
    pub(super) fn nonfinite(
        &mut self,
        done: usize,
        (loss, grad_norm, lr): (f64, f64, f64),
    ) -> Result<Guarded, TrainError> {
        // The lowest rank's first non-finite tensor, the same answer on every rank.
        let mine = first_nonfinite(self.optimizer.parameters());
        let found = crate::checkpoint::agree_on_problem(&self.par.world, mine);
        let culprit = match found {
            Some((rank, what)) => format!("rank {rank}'s first non-finite tensor is {what}"),
            None => "every rank's gradients and weights are finite".into(),
        };
        let message = format!(
            "non-finite values at step {done} ({}): {culprit}",
            describe(loss, grad_norm, lr)
        );
        let action = self.recipe.train.nonfinite;
        let stuck =
            self.nonfinite_rollbacks.0 == done && self.nonfinite_rollbacks.1 >= MAX_ROLLBACKS;
        match action {
            NonFiniteAction::Stop => Err(TrainError::NonFinite(format!(
                "{message}; nothing was applied and the last checkpoint is the newest: lower \
                 train.lr, check the data and the recipe, or set train.nonfinite: skip or \
                 rollback"
            ))),
            NonFiniteAction::Rollback if stuck => Err(TrainError::NonFinite(format!(
                "{message}; {MAX_ROLLBACKS} rollbacks to the last checkpoint reached it again: \
                 the cause is in the data or the recipe, not a transient fault"
            ))),
            NonFiniteAction::Skip => {
                self.optimizer.zero_grad();
                self.reducer.end_step();
                if let Some(g) = self.gather.as_mut() {
                    g.invalidate();
                }
                self.progress
                    .println(format!("warning: {message}; step skipped"));
                self.metrics.write(serde_json::json!({
                    "step": done, "nonfinite": {"action": "skip", "problem": message},
                }))?;
                Ok(Guarded::Skipped)
            }
            NonFiniteAction::Rollback => {
                let count = match self.nonfinite_rollbacks.0 == done {
                    true => self.nonfinite_rollbacks.1 + 1,
                    false => 1,
                };
                self.nonfinite_rollbacks = (done, count);
                self.reducer.end_step();
                self.roll_back(&message, done, ("nonfinite_rollback", Vec::new()))?;
                Ok(Guarded::RolledBack)
            }
        }
    }
}

/// The first non-finite value among this rank's checkpoint pieces (fp32 and bf16), by
/// tensor name: a checkpoint is never written from non-finite weights.
pub fn check_pieces(state: &RankState) -> Option<String> {
    state.tensors.iter().find_map(|t| {
        let finite = match t.dtype {
            Dtype::F32 => t
                .data
                .chunks_exact(4)
                .all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()),
            // An exponent of all ones is an infinity or a NaN.
            Dtype::BF16 => (t.data.chunks_exact(2))
                .all(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7f80 != 0x7f80),
            Dtype::F16 => (t.data.chunks_exact(2))
                .all(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7c00 != 0x7c00),
            Dtype::I64 | Dtype::I32 => true,
        };
        (!finite).then(|| t.name.clone())
    })
}
