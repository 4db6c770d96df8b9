//! Gradient reductions over the mesh: dense gradients summed over the world, expert
//! gradients over their replicas, in rank order (deterministic whatever the timing),
//! then divided by the world so every rank holds the gradient of the global mean loss.
//! It owns no optimizer state: it rewrites the gradients of the parameters it is given.

use super::mesh::{is_expert_param, Group, Parallel};
use catapult_kernels::comm::Comm;
use catapult_kernels::nccl::NcclComm;
use catapult_kernels::NcclError;
use tch::{Kind, Tensor};

/// Reduces the gradients of `params` (every rank's parameters in one order) over the
/// mesh: dense ones over the world, expert ones over the replicas holding the same
/// experts; both divided by the world size.
pub fn reduce_gradients(par: &Parallel, params: &[(String, Tensor)]) -> Result<(), NcclError> {
    let world = par.world.size() as f64;
    let dense = |n: &str| !is_expert_param(n);
    sum_over(params, &par.world, &par.world, dense, world)?;
    sum_over(params, &par.replicas, &par.world, is_expert_param, world)
}

/// Replaces the gradients of the parameters `select` picks with their sum over the
/// ranks of `group` divided by `divisor`, deterministically (rank-order sums). A
/// gradient any rank of `world` has is defined on all afterwards (zeros where a rank
/// had none), as one process holding every micro-batch and every expert would see it
/// (an expert shard that received no tokens still takes its decay step).
/// With the group's NCCL communicator, the sums run GPU to GPU.
fn sum_over(
    params: &[(String, Tensor)],
    group: &Group,
    world: &Comm,
    select: impl Fn(&str) -> bool,
    divisor: f64,
) -> Result<(), NcclError> {
    if world.size() == 1 && divisor == 1.0 {
        return Ok(());
    }
    let chosen: Vec<&(String, Tensor)> = params.iter().filter(|(n, _)| select(n)).collect();
    let mut defined: Vec<i32> = chosen
        .iter()
        .map(|(_, p)| i32::from(p.grad().defined()))
        .collect();
    world.all_reduce_sum(&mut defined);
    for ((_, p), &d) in chosen.iter().zip(&defined) {
        if d > 0 && !p.grad().defined() {
            // A parameter this rank did not touch: a zero gradient, so that the
            // reduced one has somewhere to go.
            (p.sum(Kind::Float) * 0.0).backward();
        }
    }
    let live: Vec<&Tensor> = chosen
        .iter()
        .zip(&defined)
        .filter(|(_, &d)| d > 0)
        .map(|((_, p), _)| p)
        .collect();
    tch::no_grad(|| match group.nccl() {
        Some(nccl) => sum_on_gpu(&live, nccl, divisor),
        None => {
            sum_on_host(&live, group, divisor);
            Ok(())
        }
    })
}

/// Sums the gradients of `live` over NCCL (the same ranks as the group), in one buffer.
fn sum_on_gpu(live: &[&Tensor], nccl: &NcclComm, divisor: f64) -> Result<(), NcclError> {
    if live.is_empty() {
        return Ok(());
    }
    let flat: Vec<Tensor> = live
        .iter()
        .map(|p| p.grad().to_kind(Kind::Float).reshape([-1]))
        .collect();
    let summed = nccl.all_reduce_sum(&Tensor::cat(&flat, 0))?;
    let mut at = 0;
    for p in live {
        let n = p.numel() as i64;
        let g = summed
            .narrow(0, at, n)
            .view(p.size().as_slice())
            .to_kind(p.kind())
            / divisor;
        at += n;
        p.grad().copy_(&g);
    }
    Ok(())
}

/// Sums the gradients of `live` over the group's host communicator (rank-order sums),
/// in one f32 buffer.
fn sum_on_host(live: &[&Tensor], group: &Comm, divisor: f64) {
    let mut flat: Vec<f32> = Vec::new();
    for p in live {
        let g = p.grad().to_kind(Kind::Float);
        let v: Vec<f32> = Vec::try_from(&g.reshape([-1]).to_device(tch::Device::Cpu))
            .expect("gradients convert to f32 on the host");
        flat.extend(v);
    }
    group.all_reduce_sum(&mut flat);
    let mut at = 0;
    for p in live {
        let n = p.numel();
        let summed = Tensor::from_slice(&flat[at..at + n])
            .view(p.size().as_slice())
            .to_device(p.device())
            .to_kind(p.kind())
            / divisor;
        at += n;
        p.grad().copy_(&summed);
    }
}
