//! One optimizer step's forward and backward work: the micro-batches of a rank's share
//! of the global batch, each through the parallel schedule, with the losses of
//! longcat-methods (next-token, load balance with global expert counts, hidden z-loss,
//! MTP) and what the step's metrics need (`StepStats`). Gradients accumulate in the
//! parameters; reducing them over ranks is the loop's next step, not this module's.

use crate::batch::{batch_tensors, document_mask};
use crate::losses::{cross_entropy, hidden_z_loss, load_balance_loss_global, BalanceShape};
use crate::model::LongcatModel;
use crate::parallel::{forward, Forward, Parallel, SegmentHooks, Training};
use crate::recipe::{Recipe, Recompute};
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
    /// Selections per layer and expert (layers x (N + Z), i64), over every rank.
    pub counts: Tensor,
    /// Tokens over every rank.
    pub tokens: i64,
    /// Summed next-token loss of this rank's micro-batches.
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
        Self {
            counts: Tensor::zeros(shape, (Kind::Int64, device)),
            tokens: 0,
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

    /// Averages the loss terms over ranks (the counts are global already).
    pub fn all_reduce(&mut self, comm: &Comm) {
        if comm.size() == 1 {
            return;
        }
        let world = comm.size() as f64;
        let mut losses = [self.lm_loss, self.balance_loss, self.z_loss, self.mtp_loss];
        comm.all_reduce_sum(&mut losses);
        [self.lm_loss, self.balance_loss, self.z_loss, self.mtp_loss] = losses.map(|l| l / world);
    }

    /// The counts as rows of layers.
    pub fn count_rows(&self) -> Vec<Vec<i64>> {
        Vec::try_from(&self.counts).expect("counts are a layers x experts i64 tensor")
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
    /// Micro-batches per step on this rank (each loss is scaled by its inverse).
    pub micro_batches: usize,
}

/// This micro-batch's selections (layers x (N + Z)) and tokens over every rank, reduced
/// once per micro-batch.
fn global_counts(f: &Forward, inputs: &Tensor, world: &Comm) -> (Tensor, i64) {
    let local = Tensor::stack(
        &f.routing
            .iter()
            .map(|r| r.selections.shallow_clone())
            .collect::<Vec<_>>(),
        0,
    );
    let mut flat: Vec<i64> =
        Vec::try_from(&local.reshape([-1]).to_device(Device::Cpu)).expect("i64 counts");
    flat.push(inputs.numel() as i64);
    world.all_reduce_sum(&mut flat);
    let global_tokens = flat.pop().expect("the token count");
    let global = Tensor::from_slice(&flat)
        .view(local.size().as_slice())
        .to_device(local.device());
    (global, global_tokens)
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
    let (global, global_tokens) = global_counts(&f, &batch.inputs, &cx.par.world);
    let scale = 1.0 / cx.micro_batches as f64;
    let lm_loss = cross_entropy(&f.logits, &batch.targets);
    let alpha = recipe.moe.load_balance_coeff;
    let balance: Vec<Option<Tensor>> = f
        .routing
        .iter()
        .enumerate()
        .map(|(l, r)| {
            (alpha > 0.0).then(|| {
                load_balance_loss_global(
                    &r.probs,
                    &global.get(l as i64),
                    global_tokens as f64,
                    cx.shape,
                    alpha,
                )
            })
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
    stats.lm_loss += lm_loss.double_value(&[]);
    stats.balance_loss += balance
        .iter()
        .flatten()
        .map(|b| b.double_value(&[]))
        .sum::<f64>();
    stats.z_loss += z_loss.double_value(&[]);
    stats.mtp_loss += mtp_loss.double_value(&[]);
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
    stats.counts += global;
    stats.tokens += global_tokens;
    Ok(())
}
