//! Silent-data-corruption checks (longcat-methods section 9): every
//! `train.sdc_check_every` steps each rank replays its first micro-batch, and its
//! gradients must come out bit for bit the same. A rank that differs either stops the
//! run or rolls every rank back to the last checkpoint (`train.sdc_action`), at most
//! `MAX_ROLLBACKS` times in a row.

use super::step::{micro_step, MicroBatch, StepContext, StepStats};
use crate::error::TrainError;
use crate::optim::AdamW;
use crate::parallel::{is_expert_param, SegmentHooks};
use crate::recipe::SdcAction;
use catapult_kernels::comm::Comm;
use catapult_kernels::CommError;
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
/// compares: afterwards the parameters hold the replay's gradients. `hooks` gather
/// sharded parameters (no reductions start).
pub fn replay(
    cx: &StepContext,
    batch: &MicroBatch,
    (optimizer, hooks): (&mut AdamW, &mut dyn SegmentHooks),
    scratch: StepStats,
    rank: usize,
    done: usize,
) -> Result<Replay, CommError> {
    let started = Instant::now();
    let first = optimizer.gradients();
    optimizer.zero_grad();
    let mut scratch = scratch;
    micro_step(cx, batch, false, &mut scratch, hooks)?;
    fault_hook(rank, done, optimizer);
    let differs = first_difference(&first, &optimizer.gradients());
    Ok(Replay {
        seconds: started.elapsed().as_secs_f64(),
        differs,
    })
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
/// gradients come out wrong, once per process, as a flaky unit would make them
/// (`sdc:RANK:STEP:always`: every time, as a broken one would).
fn fault_hook(rank: usize, step: usize, optimizer: &AdamW) {
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let want = format!("sdc:{rank}:{step}");
    let fault = std::env::var(crate::supervision::env::FAULT).unwrap_or_default();
    if fault == format!("{want}:always")
        || (fault == want && !FIRED.swap(true, std::sync::atomic::Ordering::SeqCst))
    {
        if let Some((_, p)) = optimizer
            .parameters()
            .iter()
            .find(|(n, _)| is_expert_param(n))
        {
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

/// What the run does after a replay.
pub enum Verdict {
    /// Every rank computed the same gradients twice.
    Clean,
    /// Some rank did not: roll back to the last checkpoint.
    RollBack {
        /// What differed, for the warning and the error.
        message: String,
        /// "rank R: TENSOR" for each rank that differed.
        ranks: Vec<String>,
    },
}

/// Settles a step's replay over every rank: `Clean` when all agreed; a rollback when
/// some rank differed and `action` allows one (fewer than `MAX_ROLLBACKS` in a row so
/// far); an error when the run must stop.
pub fn verdict(
    comm: &Comm,
    replay: &Replay,
    done: usize,
    action: SdcAction,
    rollbacks: usize,
) -> Result<Verdict, TrainError> {
    let bad = corrupted_ranks(comm, replay.differs.as_deref());
    if bad.is_empty() {
        return Ok(Verdict::Clean);
    }
    let message = format!(
        "silent data corruption at step {done}: replaying the first micro-batch gave \
         different gradients on {}; the hardware of those ranks computes \
         unreliably: replace the node, or set train.sdc_action: rollback to retry \
         from the last checkpoint",
        bad.join("; ")
    );
    if action == SdcAction::Stop || rollbacks >= MAX_ROLLBACKS {
        return Err(TrainError::Corruption(message));
    }
    Ok(Verdict::RollBack {
        message,
        ranks: bad,
    })
}
