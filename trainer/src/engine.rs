//! The step across ranks: the layout of the world (data x expert parallel), and the
//! forward and backward passes of the model with the MoE's all-to-alls in them.
//!
//! tch has no custom autograd functions, so the graph is cut at every collective and this
//! module runs backward segment by segment, in reverse, moving gradients through the
//! mirrored all-to-all. Per layer there are three graphs:
//!
//! ```text
//! pre:    x -> h1, u, probs, sent            (MLA0, norm, router, rows to dispatch)
//!           dispatch all-to-all: sent -> received          (cut)
//! expert: received -> expert outputs         (this rank's experts, expert-major)
//!           combine all-to-all: outputs -> returned        (cut)
//! post:   h1', u', probs', returned -> out   (FFN0, MLA1, FFN1, the MoE combine)
//! ```
//!
//! where h1', u', probs' are leaves holding the values of h1, u, probs. Backward of a
//! layer, given the gradient of its output: post (plus the layer's load-balance loss),
//! then the combine's mirror (gradients of `returned` to the owners), expert, the
//! dispatch's mirror (gradients of `received` back to the senders), then pre with the
//! gradients of h1, u, probs (from the leaves) and of `sent`. The gradient of x is the
//! previous layer's output gradient. The embedding and the head are one more segment at
//! each end. Every gradient is computed once from its own segment, so the schedule does
//! not change what autograd computes, only when.
//!
//! Single Batch Overlap (longcat-methods section 1): with `overlap`, the dispatch starts
//! right after routing and is waited on after FFN0; the combine starts after the experts
//! and is waited on after MLA1 and FFN1, just before the layer output needs it.

use crate::model::LongcatModel;
use catapult_kernels::comm::Comm;
use catapult_kernels::ep::{Direction, ExchangeStats, Plan};
use catapult_kernels::nccl::NcclComm;
use catapult_kernels::CommError;
use std::ops::Range;
use tch::{Kind, Tensor};

/// How the world is split: world = data x expert. Rank r is expert-parallel rank
/// r % expert of data-parallel replica r / expert.
pub struct Parallel {
    /// Every rank.
    pub world: Comm,
    /// The ranks that split the experts between them (one replica).
    pub expert: Comm,
    /// The ranks that hold the same experts (one per replica).
    pub replicas: Comm,
    /// Expert-parallel size.
    pub expert_size: usize,
    /// Data-parallel size (replicas of each expert).
    pub data_size: usize,
    /// Overlap the all-to-alls with the dense compute.
    pub overlap: bool,
    /// NCCL over the same ranks as `world`, `expert` and `replicas` (CUDA tensors move
    /// GPU to GPU), when the recipe's backend is NCCL.
    pub nccl: Option<[NcclComm; 3]>,
}

impl std::fmt::Debug for Parallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Parallel(rank {} of {}: data {} x expert {})",
            self.world.rank(),
            self.world.size(),
            self.data_size,
            self.expert_size
        )
    }
}

impl Parallel {
    /// Splits `world` into expert groups of `expert` ranks. `data` is the requested
    /// data-parallel size (0: whatever the world leaves). Errors say what to change.
    pub fn new(world: Comm, expert: usize, data: usize, overlap: bool) -> Result<Self, String> {
        Self::with_nccl(world, expert, data, overlap, None)
    }

    /// `new`, with NCCL communicators over the same groups on the GPU `nccl` names.
    pub fn with_nccl(
        world: Comm,
        expert: usize,
        data: usize,
        overlap: bool,
        nccl: Option<tch::Device>,
    ) -> Result<Self, String> {
        let p = world.size();
        if expert == 0 || !p.is_multiple_of(expert) {
            return Err(format!(
                "parallel.expert = {expert} does not divide the world of {p} rank(s); start \
                 a multiple of {expert} ranks (mpirun -np {expert} catapult train ...) or set \
                 parallel.expert to a divisor of {p}"
            ));
        }
        if data != 0 && data * expert != p {
            return Err(format!(
                "parallel.data = {data} x parallel.expert = {expert} = {} ranks, but the world \
                 has {p}; start {} ranks or set parallel.data to {} (or 0 for auto)",
                data * expert,
                data * expert,
                p / expert
            ));
        }
        let r = world.rank();
        let group = world.split(r / expert, r % expert);
        let replicas = world.split(r % expert, r / expert);
        let nccl = match nccl {
            None => None,
            Some(device) => Some([
                NcclComm::new(&world, device).map_err(|e| e.to_string())?,
                NcclComm::new(&group, device).map_err(|e| e.to_string())?,
                NcclComm::new(&replicas, device).map_err(|e| e.to_string())?,
            ]),
        };
        Ok(Self {
            world,
            expert: group,
            replicas,
            expert_size: expert,
            data_size: p / expert,
            overlap,
            nccl,
        })
    }

    /// A world of one.
    pub fn single() -> Self {
        Self {
            world: Comm::Single,
            expert: Comm::Single,
            replicas: Comm::Single,
            expert_size: 1,
            data_size: 1,
            overlap: false,
            nccl: None,
        }
    }

    /// The NCCL communicator over the world (0), the expert group (1) or the replicas
    /// (2), if the backend is NCCL.
    pub fn nccl(&self, which: usize) -> Option<&NcclComm> {
        self.nccl.as_ref().map(|n| &n[which])
    }

    /// The routed experts (of `n`) this rank holds.
    pub fn local_experts(&self, n: usize) -> Range<usize> {
        let per = n / self.expert_size;
        let e = self.expert.rank();
        e * per..(e + 1) * per
    }
}

/// Whether a parameter is a routed expert's (split over the expert-parallel ranks).
pub fn is_expert_param(name: &str) -> bool {
    name.contains(".mlp.experts.")
}

/// What one layer's MoE did, for the losses and metrics.
#[derive(Debug)]
pub struct LayerRouting {
    /// Router probabilities p, tokens x (N + Z), fp32: a leaf of the post segment, so
    /// its gradient after `backward` is the whole loss's gradient with respect to p.
    pub probs: Tensor,
    /// Selections per expert (N FFN then Z zero) of this rank's tokens, i64.
    pub selections: Tensor,
}

struct LayerTape {
    input: Tensor,
    /// (pre-segment value, its leaf in the post segment): h1, u, probs.
    joints: Vec<(Tensor, Tensor)>,
    sent: Tensor,
    received: Tensor,
    expert_out: Tensor,
    returned: Tensor,
    out: Tensor,
    plan: Plan,
}

/// A forward pass, remembered for its backward.
pub struct Forward {
    /// Next-token logits, batch x seq x vocab, fp32.
    pub logits: Tensor,
    /// The last layer's output (a leaf: the head segment starts here).
    pub last_hidden: Tensor,
    /// Per layer, what the router did.
    pub routing: Vec<LayerRouting>,
    embedded: Tensor,
    layers: Vec<LayerTape>,
}

fn leaf(t: &Tensor, train: bool) -> Tensor {
    let d = t.detach();
    if train {
        d.set_requires_grad(true)
    } else {
        d
    }
}

fn grad_or_zeros(t: &Tensor) -> Tensor {
    let g = t.grad();
    if g.defined() {
        g
    } else {
        t.zeros_like()
    }
}

/// The model on `tokens` (batch x seq) over the expert-parallel group of `par`. With
/// `train`, the cut points are leaves that collect gradients for `Forward::backward`;
/// without (evaluation, under `no_grad`), nothing is remembered beyond the outputs.
pub fn forward(
    model: &LongcatModel,
    par: &Parallel,
    tokens: &Tensor,
    mask: Option<&Tensor>,
    train: bool,
    stats: &mut ExchangeStats,
) -> Result<Forward, CommError> {
    let rope = model.rope();
    let embedded = model.embed(tokens);
    let mut x = leaf(&embedded, train);
    let mut layers = Vec::with_capacity(model.layers.len());
    let mut routing = Vec::with_capacity(model.layers.len());
    for layer in &model.layers {
        let shape = x.size();
        let hidden = shape[2];
        // pre: attention 0, the router, the rows to send.
        let (h1, u) = layer.attention0(&x, rope, mask);
        let flat = u.reshape([-1, hidden]);
        let (probs, choice) = layer.moe.route(&flat);
        let dispatch = layer.moe.dispatch(&choice);
        let sent = dispatch.gather(&flat);
        let plan = Plan::new(&par.expert, &dispatch, x.device())?;
        let mut flight = plan.start(&par.expert, par.nccl(1), &sent, Direction::ToOwners)?;
        let (h1_d, u_d, probs_d) = (leaf(&h1, train), leaf(&u, train), leaf(&probs, train));
        let weights = layer.moe.gate_weights(&probs_d, &choice);
        // FFN0 while the dispatch moves (or after it, without overlap).
        let (h2, received) = if par.overlap {
            let h2 = layer.ffn0(&h1_d, &u_d);
            flight.poll();
            (h2, flight.wait(train, stats)?)
        } else {
            let received = flight.wait(train, stats)?;
            (layer.ffn0(&h1_d, &u_d), received)
        };
        // expert: this rank's experts on what arrived, back in arrival order.
        let expert_out = plan.source_major(
            &layer
                .moe
                .local_experts(&plan.expert_major(&received), &plan.local_counts),
        );
        let mut back = plan.start(&par.expert, par.nccl(1), &expert_out, Direction::Back)?;
        // MLA1 and FFN1 while the combine moves.
        let (f1, returned) = if par.overlap {
            let h3 = layer.attention1(&h2, rope, mask);
            back.poll();
            let f1 = layer.ffn1(&h3);
            (f1, back.wait(train, stats)?)
        } else {
            let returned = back.wait(train, stats)?;
            (layer.ffn1(&layer.attention1(&h2, rope, mask)), returned)
        };
        let is_ffn = layer.moe.ffn_mask(&choice, Kind::Float);
        let m = dispatch.combine(&returned, &weights, &is_ffn, &u_d.reshape([-1, hidden]));
        let out = f1 + m.view(shape.as_slice());
        routing.push(LayerRouting {
            probs: probs_d.shallow_clone(),
            selections: dispatch.selections.shallow_clone(),
        });
        let next = leaf(&out, train);
        if train {
            layers.push(LayerTape {
                input: x,
                joints: vec![(h1, h1_d), (u, u_d), (probs, probs_d)],
                sent,
                received,
                expert_out,
                returned,
                out,
                plan,
            });
        }
        x = next;
    }
    let logits = model.head(&x);
    Ok(Forward {
        logits,
        last_hidden: x,
        routing,
        embedded,
        layers,
    })
}

impl Forward {
    /// Backward of `head_loss` (a function of the logits and `last_hidden`) plus
    /// `layer_losses[l]` (functions of layer l's `routing.probs`, e.g. the load-balance
    /// loss), segment by segment; gradients accumulate in the parameters.
    pub fn backward(
        self,
        par: &Parallel,
        head_loss: &Tensor,
        layer_losses: Vec<Option<Tensor>>,
        stats: &mut ExchangeStats,
    ) -> Result<(), CommError> {
        assert_eq!(
            layer_losses.len(),
            self.layers.len(),
            "one loss slot per layer"
        );
        head_loss.backward();
        let mut g = grad_or_zeros(&self.last_hidden);
        for (t, loss) in self.layers.into_iter().zip(layer_losses).rev() {
            let mut post = (&t.out * &g).sum(Kind::Float);
            if let Some(l) = loss {
                post += l;
            }
            post.backward();
            let g_out = plan_move(
                &t.plan,
                par,
                &grad_or_zeros(&t.returned),
                Direction::ToOwners,
                stats,
            )?;
            if t.expert_out.requires_grad() {
                (&t.expert_out * g_out).sum(Kind::Float).backward();
            }
            let g_sent = plan_move(
                &t.plan,
                par,
                &grad_or_zeros(&t.received),
                Direction::Back,
                stats,
            )?;
            let mut pre = (&t.sent * g_sent).sum(Kind::Float);
            for (value, joint) in &t.joints {
                let gj = joint.grad();
                if gj.defined() {
                    pre += (value * gj).sum(Kind::Float);
                }
            }
            if pre.requires_grad() {
                pre.backward();
            }
            g = grad_or_zeros(&t.input);
        }
        (&self.embedded * g).sum(Kind::Float).backward();
        Ok(())
    }
}

fn plan_move(
    plan: &Plan,
    par: &Parallel,
    rows: &Tensor,
    direction: Direction,
    stats: &mut ExchangeStats,
) -> Result<Tensor, CommError> {
    plan.start(&par.expert, par.nccl(1), rows, direction)?
        .wait(false, stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::ModelConfig;
    use tch::{nn::VarStore, Device};

    fn config() -> ModelConfig {
        crate::recipe::tests_support::model_config(4, 2, 3, 2, 2)
    }

    #[test]
    fn the_segmented_backward_equals_plain_autograd() {
        let c = config();
        // One model for both passes (other tests draw from the global RNG concurrently).
        let mut vs = VarStore::new(Device::Cpu);
        let model = LongcatModel::new(&vs.root(), &c, 16, Kind::Double, Device::Cpu);
        // Doubles (except the fp32 router), so the two summation orders agree closely.
        vs.double();
        let ids: Vec<i64> = (0..18).map(|i| (i * 37 + 11) % 256).collect();
        let tokens = Tensor::from_slice(&ids).view([2, 9]);
        let par = Parallel::single();
        let grads = |segmented: bool| {
            let mut stats = ExchangeStats::default();
            if segmented {
                let f = forward(&model, &par, &tokens, None, true, &mut stats).unwrap();
                let head = f.logits.square().mean(Kind::Double);
                let lb: Vec<Option<Tensor>> = f
                    .routing
                    .iter()
                    .map(|r| Some(r.probs.narrow(1, 0, 2).sum(Kind::Double) * 0.1))
                    .collect();
                f.backward(&par, &head, lb, &mut stats).unwrap();
            } else {
                let out = model.forward(&tokens);
                let mut loss = out.logits.square().mean(Kind::Double);
                for m in &out.moe {
                    loss += m.probs.narrow(1, 0, 2).sum(Kind::Double) * 0.1;
                }
                loss.backward();
            }
            let mut named: Vec<(String, Tensor)> = vs
                .variables()
                .into_iter()
                .filter(|(_, t)| t.requires_grad())
                .collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            named
                .into_iter()
                .map(|(n, mut t)| {
                    let g = t.grad().copy();
                    t.zero_grad();
                    (n, g)
                })
                .collect::<Vec<_>>()
        };
        let plain = grads(false);
        let segmented = grads(true);
        assert_eq!(plain.len(), segmented.len());
        for ((name, a), (_, b)) in plain.iter().zip(&segmented) {
            assert!(a.defined() && b.defined(), "{name}: no gradient");
            let scale = a.abs().max().double_value(&[]).max(1e-30);
            let diff = (a - b).abs().max().double_value(&[]) / scale;
            assert!(diff < 1e-6, "{name}: relative difference {diff}");
        }
    }
}
