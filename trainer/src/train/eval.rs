//! Validation: the mean held-out loss of each dataset, computed by all ranks together
//! (every rank takes part in the MoE's all-to-alls), and its metrics line.

use crate::batch::batch_tensors;
use crate::losses::cross_entropy;
use crate::model::LongcatModel;
use crate::parallel::{forward, Parallel, SegmentHooks, Training};
use catapult_kernels::ep::ExchangeStats;
use catapult_kernels::CommError;
use tch::Device;

/// What an evaluation pass runs on: the model, the mesh, and the hooks that gather
/// sharded parameters.
pub type Pass<'a, 'b> = (&'a LongcatModel, &'a Parallel, &'b mut dyn SegmentHooks);

/// The held-out sequences of each dataset, by name.
pub type ValidationSets = Vec<(String, Vec<Vec<u32>>)>;

/// Mean loss over `sequences`: the chunks of `micro` sequences are dealt round-robin to
/// the ranks (a rank without a chunk in a round runs one with weight 0, since every rank
/// takes part in the MoE's all-to-alls), and the weighted sums are added in rank order.
fn mean_loss(
    (model, par, hooks): Pass,
    sequences: &[Vec<u32>],
    micro: usize,
    device: Device,
) -> Result<f64, CommError> {
    let (rank, world) = (par.world.rank(), par.world.size());
    tch::no_grad(|| {
        let chunks: Vec<&[Vec<u32>]> = sequences.chunks(micro).collect();
        let mut sums = [0.0f64, 0.0];
        let mut stats = ExchangeStats::default();
        for round in 0..chunks.len().div_ceil(world) {
            let (chunk, weight) = match chunks.get(round * world + rank) {
                Some(c) => (*c, 1.0),
                None => (chunks[0], 0.0),
            };
            let (inputs, targets) = batch_tensors(chunk, device);
            let f = forward(model, par, &inputs, None, Training::No, &mut stats, hooks)?;
            let loss = cross_entropy(&f.logits, &targets).double_value(&[]);
            sums[0] += weight * loss * chunk.len() as f64;
            sums[1] += weight * chunk.len() as f64;
        }
        par.world.all_reduce_sum(&mut sums);
        Ok(sums[0] / sums[1])
    })
}

/// The validation loss at `step` (the mean over datasets of each one's held-out loss)
/// and its metrics line (with `val_loss_by_dataset` for a mixture).
pub fn validate(
    (model, par, hooks): Pass,
    valid: &ValidationSets,
    micro: usize,
    device: Device,
    step: usize,
) -> Result<(f64, serde_json::Value), CommError> {
    let losses: Vec<(String, f64)> = valid
        .iter()
        .map(|(name, seqs)| {
            let loss = mean_loss((model, par, &mut *hooks), seqs, micro, device)?;
            Ok((name.clone(), loss))
        })
        .collect::<Result<_, CommError>>()?;
    let mean = losses.iter().map(|(_, l)| l).sum::<f64>() / losses.len() as f64;
    let mut line = serde_json::json!({"step": step, "val_loss": mean});
    if losses.len() > 1 {
        line["val_loss_by_dataset"] = losses
            .into_iter()
            .map(|(n, l)| (n, serde_json::Value::from(l)))
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    Ok((mean, line))
}
