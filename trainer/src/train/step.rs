//! One optimizer step's forward and backward work: the micro-batches of a rank's share
//! of the global batch, each through the parallel schedule, with the losses of
//! longcat-methods (next-token, load balance with the micro-batch's own expert counts,
//! hidden z-loss, MTP) and what the step's metrics need (`StepStats`). Each micro-batch
//! is a canonical one (its index over the world is rank * micro-batches + j, the same
//! sequences on any number of ranks) and computes alone: its losses are scaled by one
//! over the canonical micro-batches of the step, its counts are its own, and its loss
//! values are kept apart so that the step's are summed in canonical order. Gradients
//! land in the parameters; combining them (`parallel::reduce`) is not this module's.

use crate::batch::{batch_tensors, document_mask};
use crate::bias_control::{self, SHIFT_SLOTS};
use crate::losses::{cross_entropy, hidden_z_loss, load_balance_loss, BalanceShape};
use crate::model::LongcatModel;
use crate::parallel::{forward, Forward, Parallel, SegmentHooks, Training};
use crate::recipe::{BiasMode, Recipe, Recompute};
use catapult_data::Batch;
use catapult_kernels::comm::Comm;
use catapult_kernels::ep::ExchangeStats;
use catapult_kernels::CommError;
use tch::{Device, Kind, Tensor};

/// The load-balance loss's view of the recipe.
pub fn balance_shape(recipe: &Recipe) -> BalanceShape {
    let m = &recipe.model;
    BalanceShape {
        n_ffn: m.n_routed_experts as i64,
        n_zero: m.zero_expert_num as i64,
        top_k: m.moe_topk as i64,
        target_ffn: m.target_ffn_experts() as i64,
        groups: recipe.moe.load_balance_groups as i64,
    }
}

/// What one optimizer step accumulates over its micro-batches.
pub struct StepStats {
    /// Selections per layer and expert (layers x (N + Z), i64): this rank's until
    /// `all_reduce`, then every rank's.
    pub counts: Tensor,
    /// The `hold` controller's critical-shift histograms (layers x `SHIFT_SLOTS`, i64),
    /// summed like the counts; None in the other modes.
    pub shifts: Option<Tensor>,
    /// Tokens: this rank's until `all_reduce`, then every rank's.
    pub tokens: i64,
    /// Per micro-batch of this rank, in order: its next-token, load-balance, z and MTP
    /// loss values.
    pub micro_losses: Vec<[f64; 4]>,
    /// Summed next-token loss over the step's canonical micro-batches (`all_reduce`).
    pub lm_loss: f64,
    /// Summed load-balance loss.
    pub balance_loss: f64,
    /// Summed hidden z-loss.
    pub z_loss: f64,
    /// Summed MTP loss.
    pub mtp_loss: f64,
    /// The optimizer step (0-based) these micro-batches belong to.
    pub step: usize,
    /// R_g of the first micro-batch, when measured.
    pub gradient_ratio: f64,
    /// RMS of the last hidden state, when measured.
    pub hidden_rms: f64,
    /// All-to-all costs of the forward passes (0) and of the backward passes (1).
    pub exchange: [ExchangeStats; 2],
}

impl StepStats {
    /// Empty statistics for `step`.
    pub fn new(recipe: &Recipe, device: Device, step: usize) -> Self {
        let shape = [
            recipe.model.num_layers as i64,
            recipe.model.total_experts() as i64,
        ];
        let hold = recipe.moe.bias_control.mode == BiasMode::Hold;
        let slots = [shape[0], SHIFT_SLOTS as i64];
        Self {
            counts: Tensor::zeros(shape, (Kind::Int64, device)),
            shifts: hold.then(|| Tensor::zeros(slots, (Kind::Int64, device))),
            tokens: 0,
            micro_losses: Vec::new(),
            lm_loss: 0.0,
            balance_loss: 0.0,
            z_loss: 0.0,
            mtp_loss: 0.0,
            step,
            gradient_ratio: 0.0,
            hidden_rms: 0.0,
            exchange: [ExchangeStats::default(), ExchangeStats::default()],
        }
    }

    /// The step's statistics over every rank: counts, histograms and tokens summed
    /// (integers: any order gives the same), each loss term the sum of every canonical
    /// micro-batch's, added in canonical order (rank-major), so that the same global
    /// batch gives the same bits on any number of ranks.
    pub fn all_reduce(&mut self, comm: &Comm) {
        let mut ints: Vec<i64> =
            Vec::try_from(&self.counts.reshape([-1]).to_device(Device::Cpu)).expect("i64 counts");
        let counted = ints.len();
        if let Some(s) = &self.shifts {
            ints.extend(
                Vec::<i64>::try_from(&s.reshape([-1]).to_device(Device::Cpu)).expect("i64"),
            );
        }
        ints.push(self.tokens);
        if comm.size() > 1 {
            comm.all_reduce_sum(&mut ints);
        }
        self.tokens = ints.pop().expect("the token count");
        let device = self.counts.device();
        let back = |v: &[i64], like: &Tensor| {
            Tensor::from_slice(v)
                .view(like.size().as_slice())
                .to_device(device)
        };
        self.counts = back(&ints[..counted], &self.counts);
        if let Some(s) = &self.shifts {
            self.shifts = Some(back(&ints[counted..], s));
        }
        let mine: Vec<f64> = self.micro_losses.iter().flatten().copied().collect();
        let (all, _) = match comm.size() {
            1 => (mine, vec![]),
            _ => comm.all_gather_v(&mine),
        };
        let mut sums = [0.0; 4];
        for micro in all.chunks_exact(4) {
            for (s, v) in sums.iter_mut().zip(micro) {
                *s += v;
            }
        }
        [self.lm_loss, self.balance_loss, self.z_loss, self.mtp_loss] = sums;
    }

    /// The counts as rows of layers.
    pub fn count_rows(&self) -> Vec<Vec<i64>> {
        Vec::try_from(&self.counts).expect("counts are a layers x experts i64 tensor")
    }

    /// The critical-shift histograms as rows of layers (empty outside `hold` mode).
    pub fn shift_rows(&self) -> Vec<Vec<i64>> {
        self.shifts.as_ref().map_or_else(Vec::new, |s| {
            Vec::try_from(s).expect("histograms are a layers x slots i64 tensor")
        })
    }
}

/// One micro-batch's tensors.
pub struct MicroBatch {
    /// Input ids, micro x seq.
    pub inputs: Tensor,
    /// Next-token targets, micro x seq.
    pub targets: Tensor,
    /// The document mask, when documents are masked.
    pub mask: Option<Tensor>,
}

impl MicroBatch {
    /// Micro-batch `index` of `batch` (rows of `size` sequences); `segments` (the
    /// batch's segment ids) when documents are masked.
    pub fn of(
        batch: &Batch,
        segments: Option<&[u32]>,
        index: usize,
        size: usize,
        device: Device,
    ) -> Self {
        let rows = index * size..(index + 1) * size;
        let (inputs, targets) = batch_tensors(&batch.sequences[rows.clone()], device);
        let seq_len = batch.seq_len;
        let mask = segments
            .map(|seg| document_mask(&seg[rows.start * seq_len..rows.end * seq_len], size, device));
        Self {
            inputs,
            targets,
            mask,
        }
    }
}

/// What a micro-step works with.
pub struct StepContext<'a> {
    /// The model.
    pub model: &'a LongcatModel,
    /// The recipe (loss coefficients, MTP schedule).
    pub recipe: &'a Recipe,
    /// The mesh.
    pub par: &'a Parallel,
    /// The load-balance loss's shape.
    pub shape: BalanceShape,
    /// Canonical micro-batches per step over every rank (each loss is scaled by its
    /// inverse).
    pub micro_batches: usize,
}

/// This micro-batch's selections (layers x (N + Z)).
fn local_counts(f: &Forward) -> Tensor {
    Tensor::stack(
        &f.routing
            .iter()
            .map(|r| r.selections.shallow_clone())
            .collect::<Vec<_>>(),
        0,
    )
}

/// This micro-batch's critical-shift histograms (layers x `SHIFT_SLOTS`) for the `hold`
/// controller, from the scores its top-K ran on.
fn shift_histograms(cx: &StepContext, f: &Forward) -> Tensor {
    let m = &cx.recipe.model;
    let max = bias_control::max_shift(&cx.recipe.moe.bias_control, m);
    let device = f.logits.device();
    let edges = Tensor::from_slice(&bias_control::shift_edges(max)).to_device(device);
    let per_layer: Vec<Tensor> = f
        .routing
        .iter()
        .zip(&cx.model.layers)
        .map(|(r, layer)| {
            let scores = r.probs.detach() + &layer.moe.expert_bias;
            bias_control::shift_histogram(
                &scores,
                m.n_routed_experts as i64,
                m.moe_topk as i64,
                &edges,
            )
        })
        .collect();
    Tensor::stack(&per_layer, 0)
}

/// The MTP loss of the micro-batch (zero before `train.mtp_start_step` or without an MTP
/// layer).
fn mtp_loss(cx: &StepContext, batch: &MicroBatch, f: &Forward, step: usize) -> Tensor {
    let mtp_on = cx.model.mtp.is_some() && step >= cx.recipe.train.mtp_start_step;
    if !mtp_on {
        return Tensor::zeros([], (Kind::Float, batch.inputs.device()));
    }
    let main = crate::model::ModelOutput {
        logits: f.logits.shallow_clone(),
        last_hidden: f.last_hidden.shallow_clone(),
        moe: Vec::new(),
    };
    let logits = cx
        .model
        .forward_mtp_masked(&batch.inputs, &main, batch.mask.as_ref())
        .expect("the model has an MTP layer");
    let seq = batch.targets.size()[1];
    cross_entropy(&logits, &batch.targets.narrow(1, 1, seq - 1))
}

/// R_g = ||grad_P L_LB|| / ||grad_P L_rest|| (section 6) after the backward: the
/// gradient with respect to the batch-averaged probability vector P is the per-token
/// gradient summed over tokens, over all layers; L_rest is the rest of the loss.
fn gradient_ratio(probs: &[Tensor], lb_grads: &[Tensor], micro_batches: usize) -> f64 {
    tch::no_grad(|| {
        // The whole gradient, unscaled, minus the load-balance part.
        let rest: Vec<Tensor> = probs
            .iter()
            .zip(lb_grads)
            .map(|(p, g)| {
                p.grad().sum_dim_intlist(0, false, Kind::Float) * micro_batches as f64 - g
            })
            .collect();
        let lb = Tensor::cat(lb_grads, 0).norm().double_value(&[]);
        lb / Tensor::cat(&rest, 0).norm().double_value(&[]).max(1e-30)
    })
}

/// Forward and backward of one micro-batch through the parallel schedule; gradients
/// accumulate in the parameters. The load-balance loss and the statistics use the
/// micro-batch's global expert counts (every rank's). With `measure_rg`, also R_g and
/// the hidden RMS. `hooks` run around each segment's forward and backward.
pub fn micro_step(
    cx: &StepContext,
    batch: &MicroBatch,
    measure_rg: bool,
    stats: &mut StepStats,
    hooks: &mut dyn SegmentHooks,
) -> Result<(), CommError> {
    let recipe = cx.recipe;
    let training = match recipe.train.recompute {
        Recompute::None => Training::Keep,
        Recompute::Layer => Training::Recompute,
    };
    let f = forward(
        cx.model,
        cx.par,
        &batch.inputs,
        batch.mask.as_ref(),
        training,
        &mut stats.exchange[0],
        hooks,
    )?;
    let counts = local_counts(&f);
    let tokens = batch.inputs.numel() as i64;
    if let Some(shifts) = stats.shifts.as_mut() {
        *shifts += shift_histograms(cx, &f);
    }
    let scale = 1.0 / cx.micro_batches as f64;
    let lm_loss = cross_entropy(&f.logits, &batch.targets);
    let alpha = recipe.moe.load_balance_coeff;
    let balance: Vec<Option<Tensor>> = f
        .routing
        .iter()
        .enumerate()
        .map(|(l, r)| {
            (alpha > 0.0)
                .then(|| load_balance_loss(&r.probs, &counts.get(l as i64), cx.shape, alpha))
        })
        .collect();
    let lb_grads: Option<Vec<Tensor>> = (measure_rg && alpha > 0.0).then(|| {
        balance
            .iter()
            .zip(&f.routing)
            .map(|(term, r)| {
                let term = term.as_ref().expect("alpha > 0");
                Tensor::run_backward(&[term], &[&r.probs], true, false)[0].sum_dim_intlist(
                    0,
                    false,
                    Kind::Float,
                )
            })
            .collect()
    });
    let z_loss = if recipe.moe.z_loss_coeff > 0.0 {
        hidden_z_loss(&f.last_hidden, recipe.moe.z_loss_coeff)
    } else {
        Tensor::zeros([], (Kind::Float, batch.inputs.device()))
    };
    let mtp_loss = mtp_loss(cx, batch, &f, stats.step);
    let head = (&lm_loss + &z_loss + &mtp_loss * recipe.train.mtp_loss_weight) * scale;
    stats.micro_losses.push([
        lm_loss.double_value(&[]),
        balance
            .iter()
            .flatten()
            .map(|b| b.double_value(&[]))
            .sum::<f64>(),
        z_loss.double_value(&[]),
        mtp_loss.double_value(&[]),
    ]);
    if measure_rg {
        stats.hidden_rms = tch::no_grad(|| {
            f.last_hidden
                .to_kind(Kind::Float)
                .square()
                .mean(Kind::Float)
                .sqrt()
                .double_value(&[])
        });
    }
    let probs: Vec<Tensor> = f.routing.iter().map(|r| r.probs.shallow_clone()).collect();
    let layer_losses = balance.into_iter().map(|b| b.map(|b| b * scale)).collect();
    f.backward(
        cx.model,
        cx.par,
        &head,
        layer_losses,
        &mut stats.exchange[1],
        hooks,
    )?;
    if measure_rg {
        stats.gradient_ratio = match lb_grads {
            Some(lb) => gradient_ratio(&probs, &lb, cx.micro_batches),
            None => 0.0,
        };
    }
    stats.counts += counts;
    stats.tokens += tokens;
    Ok(())
}
