//! The segmented schedule: the model's forward pass with the MoE's all-to-alls in it
//! (the layer's own code, driven through `TapeExchange`), remembered per layer, and the
//! backward pass run segment by segment across the collectives.
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

use super::mesh::{Parallel, Segment};
use crate::model::{LongcatModel, MoeExchange};
use catapult_kernels::ep::{Direction, ExchangeStats, InFlight, Plan};
use catapult_kernels::moe::ExpertDispatch;
use catapult_kernels::CommError;
use tch::{Kind, Tensor};

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

/// What a layer keeps for its backward: its whole graph, or (activation recomputation)
/// only what re-running it needs.
enum Kept {
    Graph(LayerTape),
    Replay(ReplayTape),
}

/// A layer to re-run in backward: its input, the router probabilities' leaf (the
/// load-balance loss was built on it) and the rows its exchanges brought, so that no
/// all-to-all runs twice.
struct ReplayTape {
    input: Tensor,
    probs: Tensor,
    received: Tensor,
    returned: Tensor,
    plan: Plan,
}

/// Which of a layer's cuts (h1, u, probs) is the router probabilities.
const PROBS_CUT: usize = 2;

/// How a forward pass serves a backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Training {
    /// No backward (evaluation, under `no_grad`).
    No,
    /// Keep every layer's graph.
    Keep,
    /// Keep each layer's input and received rows; re-run the layer in backward.
    Recompute,
}

/// What runs around each segment's passes: before its forward, before its parameters'
/// gradients start accumulating (before its recomputation, with `Recompute`), and once
/// they are complete for this micro-batch (the gradient reductions start there).
pub trait SegmentHooks {
    /// Before `segment`'s forward (the ends: before the embedding and the head).
    fn before_forward(&mut self, _segment: Segment) -> Result<(), CommError> {
        Ok(())
    }
    /// Before the backward reaches `segment`'s parameters.
    fn before(&mut self, segment: Segment) -> Result<(), CommError>;
    /// After `segment`'s parameters have their gradients of this micro-batch.
    fn after(&mut self, segment: Segment) -> Result<(), CommError>;
}

/// No hooks.
pub struct NoHooks;

impl SegmentHooks for NoHooks {
    fn before(&mut self, _: Segment) -> Result<(), CommError> {
        Ok(())
    }
    fn after(&mut self, _: Segment) -> Result<(), CommError> {
        Ok(())
    }
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
    layers: Vec<Kept>,
    mask: Option<Tensor>,
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

/// One layer's exchange over the expert group: the rows travel by the layer's `Plan`,
/// every cut becomes a leaf (when training), and what the backward needs is kept.
/// Without overlap, each exchange completes where it starts.
struct TapeExchange<'a> {
    par: &'a Parallel,
    train: bool,
    stats: &'a mut ExchangeStats,
    plan: Option<Plan>,
    flight: Option<InFlight>,
    joints: Vec<(Tensor, Tensor)>,
    sent: Option<Tensor>,
    received: Option<Tensor>,
    expert_out: Option<Tensor>,
    returned: Option<Tensor>,
}

impl<'a> TapeExchange<'a> {
    fn new(par: &'a Parallel, train: bool, stats: &'a mut ExchangeStats) -> Self {
        Self {
            par,
            train,
            stats,
            plan: None,
            flight: None,
            joints: Vec::new(),
            sent: None,
            received: None,
            expert_out: None,
            returned: None,
        }
    }

    fn plan(&self) -> &Plan {
        self.plan
            .as_ref()
            .expect("the layer sends before anything else")
    }

    /// Starts `rows` moving in `direction`; without overlap, waits for them at once.
    fn start(&mut self, rows: &Tensor, direction: Direction) -> Result<Option<Tensor>, CommError> {
        let expert = &self.par.expert;
        let flight = self.plan().start(expert, expert.nccl(), rows, direction)?;
        if self.par.overlap {
            self.flight = Some(flight);
            Ok(None)
        } else {
            Ok(Some(flight.wait(self.train, self.stats)?))
        }
    }

    /// The rows of the exchange started last, waiting for them if still in flight.
    fn arrived(&mut self, done: Option<Tensor>) -> Result<Tensor, CommError> {
        match (done, self.flight.take()) {
            (Some(t), _) => Ok(t),
            (None, Some(mut flight)) => {
                flight.poll();
                flight.wait(self.train, self.stats)
            }
            (None, None) => unreachable!("an exchange was started"),
        }
    }

    /// What re-running this layer needs, once it has run on `input` (under `no_grad`)
    /// and its cut of the router probabilities is `probs`.
    fn into_replay(self, input: Tensor, probs: Tensor) -> ReplayTape {
        let missing = "the layer ran its whole exchange";
        ReplayTape {
            input,
            probs,
            received: self.received.expect(missing),
            returned: self.returned.expect(missing),
            plan: self.plan.expect(missing),
        }
    }

    /// What the backward of this layer needs, once the layer has run on `input`.
    fn into_tape(self, input: Tensor, out: Tensor) -> LayerTape {
        let missing = "the layer ran its whole exchange";
        LayerTape {
            input,
            joints: self.joints,
            sent: self.sent.expect(missing),
            received: self.received.expect(missing),
            expert_out: self.expert_out.expect(missing),
            returned: self.returned.expect(missing),
            out,
            plan: self.plan.expect(missing),
        }
    }
}

impl MoeExchange for TapeExchange<'_> {
    type Error = CommError;

    fn cut(&mut self, t: &Tensor) -> Tensor {
        let l = leaf(t, self.train);
        if self.train {
            self.joints.push((t.shallow_clone(), l.shallow_clone()));
        }
        l
    }

    fn send(&mut self, dispatch: &ExpertDispatch, rows: Tensor) -> Result<(), Self::Error> {
        self.plan = Some(Plan::new(&self.par.expert, dispatch, rows.device())?);
        self.received = self.start(&rows, Direction::ToOwners)?;
        self.sent = Some(rows);
        Ok(())
    }

    fn receive(&mut self) -> Result<(Tensor, Vec<i64>), Self::Error> {
        let done = self.received.take();
        let received = self.arrived(done)?;
        let rows = self.plan().expert_major(&received);
        self.received = Some(received);
        Ok((rows, self.plan().local_counts.clone()))
    }

    fn send_back(&mut self, outputs: Tensor) -> Result<(), Self::Error> {
        let expert_out = self.plan().source_major(&outputs);
        self.returned = self.start(&expert_out, Direction::Back)?;
        self.expert_out = Some(expert_out);
        Ok(())
    }

    fn progress(&mut self) {
        if let Some(f) = &mut self.flight {
            f.poll();
        }
    }

    fn returned(&mut self) -> Result<Tensor, Self::Error> {
        let done = self.returned.take();
        let returned = self.arrived(done)?;
        self.returned = Some(returned.shallow_clone());
        Ok(returned)
    }
}

/// The model on `tokens` (batch x seq) over the expert-parallel group of `par`. With
/// `train`, the cut points are leaves that collect gradients for `Forward::backward`;
/// without (evaluation, under `no_grad`), nothing is remembered beyond the outputs.
/// `hooks` run before each segment's forward.
pub fn forward(
    model: &LongcatModel,
    par: &Parallel,
    tokens: &Tensor,
    mask: Option<&Tensor>,
    training: Training,
    stats: &mut ExchangeStats,
    hooks: &mut dyn SegmentHooks,
) -> Result<Forward, CommError> {
    let train = training != Training::No;
    let rope = model.rope();
    hooks.before_forward(Segment::Ends)?;
    let embedded = model.embed(tokens);
    let mut x = leaf(&embedded, train);
    let mut layers = Vec::with_capacity(model.layers.len());
    let mut routing = Vec::with_capacity(model.layers.len());
    for (l, layer) in model.layers.iter().enumerate() {
        hooks.before_forward(Segment::Layer(l))?;
        let mut ex = TapeExchange::new(par, train, stats);
        let (out, moe) = match training {
            // No graph: the layer is re-run in backward.
            Training::Recompute => tch::no_grad(|| layer.forward_with(&x, rope, mask, &mut ex))?,
            _ => layer.forward_with(&x, rope, mask, &mut ex)?,
        };
        let probs = moe.probs.shallow_clone();
        routing.push(LayerRouting {
            probs: moe.probs,
            selections: moe.selections,
        });
        let next = leaf(&out, train);
        match training {
            Training::No => {}
            Training::Keep => layers.push(Kept::Graph(ex.into_tape(x, out))),
            Training::Recompute => layers.push(Kept::Replay(ex.into_replay(x, probs))),
        }
        x = next;
    }
    hooks.before_forward(Segment::Ends)?;
    let logits = model.head(&x);
    Ok(Forward {
        logits,
        last_hidden: x,
        routing,
        embedded,
        layers,
        mask: mask.map(Tensor::shallow_clone),
    })
}

/// Re-running a layer for its backward: the rows come from the first forward's
/// exchanges and the probabilities' cut is the first forward's leaf, so the rebuilt
/// graph computes exactly what the kept one would have.
struct ReplayExchange<'a> {
    tape: &'a ReplayTape,
    cuts: usize,
    joints: Vec<(Tensor, Tensor)>,
    sent: Option<Tensor>,
    expert_out: Option<Tensor>,
}

impl MoeExchange for ReplayExchange<'_> {
    type Error = CommError;

    fn cut(&mut self, t: &Tensor) -> Tensor {
        let l = match self.cuts {
            PROBS_CUT => self.tape.probs.shallow_clone(),
            _ => leaf(t, true),
        };
        self.cuts += 1;
        self.joints.push((t.shallow_clone(), l.shallow_clone()));
        l
    }

    fn send(&mut self, _dispatch: &ExpertDispatch, rows: Tensor) -> Result<(), Self::Error> {
        self.sent = Some(rows);
        Ok(())
    }

    fn receive(&mut self) -> Result<(Tensor, Vec<i64>), Self::Error> {
        let plan = &self.tape.plan;
        Ok((
            plan.expert_major(&self.tape.received),
            plan.local_counts.clone(),
        ))
    }

    fn send_back(&mut self, outputs: Tensor) -> Result<(), Self::Error> {
        self.expert_out = Some(self.tape.plan.source_major(&outputs));
        Ok(())
    }

    fn progress(&mut self) {}

    fn returned(&mut self) -> Result<Tensor, Self::Error> {
        Ok(self.tape.returned.shallow_clone())
    }
}

/// Layer `layer`'s graph rebuilt from `tape` (activation recomputation).
fn replay(
    model: &LongcatModel,
    layer: usize,
    mask: Option<&Tensor>,
    tape: ReplayTape,
) -> Result<LayerTape, CommError> {
    let mut ex = ReplayExchange {
        tape: &tape,
        cuts: 0,
        joints: Vec::new(),
        sent: None,
        expert_out: None,
    };
    let (out, _) = model.layers[layer].forward_with(&tape.input, model.rope(), mask, &mut ex)?;
    let missing = "the layer ran its whole exchange";
    let (joints, sent, expert_out) = (
        ex.joints,
        ex.sent.expect(missing),
        ex.expert_out.expect(missing),
    );
    Ok(LayerTape {
        input: tape.input,
        joints,
        sent,
        received: tape.received,
        expert_out,
        returned: tape.returned,
        out,
        plan: tape.plan,
    })
}

impl Forward {
    /// Backward of `head_loss` (a function of the logits and `last_hidden`) plus
    /// `layer_losses[l]` (functions of layer l's `routing.probs`, e.g. the load-balance
    /// loss), segment by segment; gradients accumulate in the parameters, and `hooks`
    /// run around each segment.
    pub fn backward(
        self,
        model: &LongcatModel,
        par: &Parallel,
        head_loss: &Tensor,
        layer_losses: Vec<Option<Tensor>>,
        stats: &mut ExchangeStats,
        hooks: &mut dyn SegmentHooks,
    ) -> Result<(), CommError> {
        assert_eq!(
            layer_losses.len(),
            self.layers.len(),
            "one loss slot per layer"
        );
        hooks.before(Segment::Ends)?;
        head_loss.backward();
        let mut g = grad_or_zeros(&self.last_hidden);
        let mask = self.mask;
        for (l, (kept, loss)) in self.layers.into_iter().zip(layer_losses).enumerate().rev() {
            hooks.before(Segment::Layer(l))?;
            let t = match kept {
                Kept::Graph(t) => t,
                Kept::Replay(r) => replay(model, l, mask.as_ref(), r)?,
            };
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
            hooks.after(Segment::Layer(l))?;
        }
        (&self.embedded * g).sum(Kind::Float).backward();
        hooks.after(Segment::Ends)
    }
}

fn plan_move(
    plan: &Plan,
    par: &Parallel,
    rows: &Tensor,
    direction: Direction,
    stats: &mut ExchangeStats,
) -> Result<Tensor, CommError> {
    plan.start(&par.expert, par.expert.nccl(), rows, direction)?
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
        crate::init::InitPlan::plain(5, c.initializer_range, 0..c.n_routed_experts).fill_all(&vs);
        // Doubles (except the fp32 router), so the two summation orders agree closely.
        vs.double();
        let ids: Vec<i64> = (0..18).map(|i| (i * 37 + 11) % 256).collect();
        let tokens = Tensor::from_slice(&ids).view([2, 9]);
        let par = Parallel::single();
        let grads = |segmented: Option<Training>| {
            let mut stats = ExchangeStats::default();
            if let Some(training) = segmented {
                let f = forward(
                    &model,
                    &par,
                    &tokens,
                    None,
                    training,
                    &mut stats,
                    &mut NoHooks,
                )
                .unwrap();
                let head = f.logits.square().mean(Kind::Double);
                let lb: Vec<Option<Tensor>> = f
                    .routing
                    .iter()
                    .map(|r| Some(r.probs.narrow(1, 0, 2).sum(Kind::Double) * 0.1))
                    .collect();
                f.backward(&model, &par, &head, lb, &mut stats, &mut NoHooks)
                    .unwrap();
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
        let plain = grads(None);
        let segmented = grads(Some(Training::Keep));
        // Recomputation rebuilds the same graphs: the same bits as keeping them.
        let recomputed = grads(Some(Training::Recompute));
        for ((name, a), (_, b)) in segmented.iter().zip(&recomputed) {
            assert!(a.equal(b), "{name}: recomputation changed the gradient");
        }
        assert_eq!(plain.len(), segmented.len());
        for ((name, a), (_, b)) in plain.iter().zip(&segmented) {
            assert!(a.defined() && b.defined(), "{name}: no gradient");
            let scale = a.abs().max().double_value(&[]).max(1e-30);
            let diff = (a - b).abs().max().double_value(&[]) / scale;
            assert!(diff < 1e-6, "{name}: relative difference {diff}");
        }
    }
}
