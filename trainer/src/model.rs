//! The LongCat-Flash model: ScMoE layers of MLA attention, dense SwiGLU FFNs and a MoE
//! with zero-computation experts (longcat-methods sections 1-3).
//!
//! Read `ScMoeLayer::forward_with` next to section 1: the names are the same, and it is
//! the only place the layer's equations are written: training drives it through the
//! parallel schedule's `MoeExchange`, a process holding every expert through `Local`. The model knows
//! nothing about ranks or devices beyond the tensors it is given; parallelism is applied
//! from outside. Parameter names follow transformers' `LongcatFlashForCausalLM`
//! (`model.layers.0.self_attn.1.q_a_proj.weight`, ...), except that the routed experts
//! are stored stacked (`mlp.experts.gate_proj`: experts x intermediate x hidden).

use crate::recipe::ModelConfig;
use catapult_kernels::moe::{ffn_choice_mask, grouped_swiglu, ExpertDispatch};
use std::ops::Range;
use tch::nn::Path;
use tch::{Kind, Tensor};

/// Epsilon of the RMSNorms inside MLA (transformers' LongcatFlashMLA uses the norm's
/// default, 1e-6, not `rms_norm_eps`).
const MLA_LATENT_NORM_EPS: f64 = 1e-6;

fn linear(x: &Tensor, weight: &Tensor) -> Tensor {
    x.matmul(&weight.to_kind(x.kind()).tr())
}

/// A trainable parameter of `shape`, declared without its values: one element broadcast
/// to the shape, on the store's device. `crate::init` draws what a rank owns of it.
fn param(p: &Path, name: &str, shape: &[i64]) -> Tensor {
    let one = Tensor::zeros([1], (Kind::Float, p.device()));
    p.add(name, one.expand(shape, false), true)
}

fn matrix(p: &Path, name: &str, out_dim: usize, in_dim: usize) -> Tensor {
    param(&p.sub(name), "weight", &[out_dim as i64, in_dim as i64])
}

/// Root-mean-square normalization, computed in fp32, returned in the input's kind.
#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(p: &Path, dim: usize, eps: f64) -> Self {
        Self {
            weight: param(p, "weight", &[dim as i64]),
            eps,
        }
    }

    /// `weight * x / sqrt(mean(x^2) + eps)`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let xf = x.to_kind(Kind::Float);
        let variance = xf.square().mean_dim(-1, true, Kind::Float);
        let normed = (xf * (variance + self.eps).rsqrt()).to_kind(x.kind());
        normed * self.weight.to_kind(x.kind())
    }
}

/// Rotary position embedding tables for the rope part of queries and keys.
#[derive(Debug)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Tables for positions 0..seq_len over `dim` rotated dimensions (fp32, as in
    /// transformers: inv_freq = 1 / theta^(2i/dim)).
    pub fn new(dim: usize, seq_len: usize, theta: f64, device: tch::Device) -> Self {
        let opts = (Kind::Float, device);
        let exponent = Tensor::arange_start_step(0, dim as i64, 2, (Kind::Int64, device))
            .to_kind(Kind::Float)
            / dim as f64;
        let inv_freq = Tensor::full([1], theta, opts).pow(&exponent).reciprocal();
        let positions = Tensor::arange(seq_len as i64, (Kind::Int64, device)).to_kind(Kind::Float);
        let freqs = positions.unsqueeze(1) * inv_freq.unsqueeze(0);
        Self {
            cos: freqs.cos(),
            sin: freqs.sin(),
        }
    }

    /// Rotates interleaved pairs (x0, x1), (x2, x3), ... of the last axis (DeepSeek
    /// layout) and returns them de-interleaved, [evens; odds], as transformers does; the
    /// same layout for queries and keys leaves their dot products unchanged.
    /// `x` is batch x heads x seq x dim.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let seq = x.size()[2];
        let cos = self.cos.narrow(0, 0, seq).to_kind(x.kind());
        let sin = self.sin.narrow(0, 0, seq).to_kind(x.kind());
        let dim = x.size()[3];
        let x1 = x.slice(-1, 0, dim, 2);
        let x2 = x.slice(-1, 1, dim, 2);
        Tensor::cat(&[&x1 * &cos - &x2 * &sin, &x2 * &cos + &x1 * &sin], -1)
    }
}

/// Multi-head latent attention with the alpha_q / alpha_kv scale correction (section 2).
#[derive(Debug)]
pub struct Mla {
    q_a_proj: Tensor,
    q_a_layernorm: RmsNorm,
    q_b_proj: Tensor,
    kv_a_proj_with_mqa: Tensor,
    kv_a_layernorm: RmsNorm,
    kv_b_proj: Tensor,
    o_proj: Tensor,
    heads: i64,
    nope_dim: i64,
    rope_dim: i64,
    v_dim: i64,
    kv_rank: i64,
    /// sqrt(d_model / q_lora_rank).
    pub alpha_q: f64,
    /// sqrt(d_model / kv_lora_rank).
    pub alpha_kv: f64,
}

impl Mla {
    fn new(p: &Path, c: &ModelConfig) -> Self {
        let heads = c.num_attention_heads;
        Self {
            q_a_proj: matrix(p, "q_a_proj", c.q_lora_rank, c.hidden_size),
            q_a_layernorm: RmsNorm::new(
                &p.sub("q_a_layernorm"),
                c.q_lora_rank,
                MLA_LATENT_NORM_EPS,
            ),
            q_b_proj: matrix(p, "q_b_proj", heads * c.qk_head_dim(), c.q_lora_rank),
            kv_a_proj_with_mqa: matrix(
                p,
                "kv_a_proj_with_mqa",
                c.kv_lora_rank + c.qk_rope_head_dim,
                c.hidden_size,
            ),
            kv_a_layernorm: RmsNorm::new(
                &p.sub("kv_a_layernorm"),
                c.kv_lora_rank,
                MLA_LATENT_NORM_EPS,
            ),
            kv_b_proj: matrix(
                p,
                "kv_b_proj",
                heads * (c.qk_nope_head_dim + c.v_head_dim),
                c.kv_lora_rank,
            ),
            o_proj: matrix(p, "o_proj", c.hidden_size, heads * c.v_head_dim),
            heads: heads as i64,
            nope_dim: c.qk_nope_head_dim as i64,
            rope_dim: c.qk_rope_head_dim as i64,
            v_dim: c.v_head_dim as i64,
            kv_rank: c.kv_lora_rank as i64,
            alpha_q: (c.hidden_size as f64 / c.q_lora_rank as f64).sqrt(),
            alpha_kv: (c.hidden_size as f64 / c.kv_lora_rank as f64).sqrt(),
        }
    }

    /// Causal self-attention over `x` (batch x seq x hidden). `mask` (batch x 1 x seq x
    /// seq, bool, true = attend) replaces the causal mask, e.g. to keep attention
    /// within documents.
    pub fn forward(&self, x: &Tensor, rope: &Rope, mask: Option<&Tensor>) -> Tensor {
        let (b, s, _) = x.size3().expect("batch x seq x hidden");
        let (nh, nope, rd, vd) = (self.heads, self.nope_dim, self.rope_dim, self.v_dim);
        let q = linear(
            &self.q_a_layernorm.forward(&linear(x, &self.q_a_proj)),
            &self.q_b_proj,
        ) * self.alpha_q;
        let q = q.view([b, s, nh, nope + rd]).transpose(1, 2);
        let compressed = linear(x, &self.kv_a_proj_with_mqa);
        let latent = self
            .kv_a_layernorm
            .forward(&compressed.narrow(-1, 0, self.kv_rank))
            * self.alpha_kv;
        let k_rope = compressed.narrow(-1, self.kv_rank, rd).view([b, 1, s, rd]);
        let kv = linear(&latent, &self.kv_b_proj)
            .view([b, s, nh, nope + vd])
            .transpose(1, 2);
        let q = Tensor::cat(
            &[q.narrow(-1, 0, nope), rope.apply(&q.narrow(-1, nope, rd))],
            -1,
        );
        let k_rope = rope.apply(&k_rope).expand([b, nh, s, rd], false);
        let k = Tensor::cat(&[kv.narrow(-1, 0, nope), k_rope], -1);
        let v = kv.narrow(-1, nope, vd);
        let scale = 1.0 / ((nope + rd) as f64).sqrt();
        let attn = match mask {
            None => Tensor::scaled_dot_product_attention::<Tensor>(
                &q, &k, &v, None, 0.0, true, scale, false,
            ),
            Some(m) => {
                Tensor::scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, scale, false)
            }
        };
        linear(&attn.transpose(1, 2).reshape([b, s, nh * vd]), &self.o_proj)
    }
}

/// Dense SwiGLU FFN: `down(silu(gate x) * up x)`.
#[derive(Debug)]
pub struct SwiGlu {
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
}

impl SwiGlu {
    fn new(p: &Path, hidden: usize, intermediate: usize) -> Self {
        Self {
            gate_proj: matrix(p, "gate_proj", intermediate, hidden),
            up_proj: matrix(p, "up_proj", intermediate, hidden),
            down_proj: matrix(p, "down_proj", hidden, intermediate),
        }
    }

    /// The FFN on `x` (... x hidden).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        linear(
            &(linear(x, &self.gate_proj).silu() * linear(x, &self.up_proj)),
            &self.down_proj,
        )
    }
}

/// Stacked expert weights (`full[0]` experts) of which this rank holds `local`; the
/// initial values are those rows of the whole tensor's (`crate::init`).
fn expert_var(p: &Path, name: &str, full: [i64; 3], local: &Range<i64>) -> Tensor {
    param(p, name, &[local.end - local.start, full[1], full[2]])
}

/// The MoE: fp32 softmax router over N FFN + Z zero experts, top-K over p + b, gate
/// weights gamma * p from the unbiased p (section 3).
#[derive(Debug)]
pub struct Moe {
    /// Router weight W_r, (N + Z) x hidden, fp32.
    pub router: Tensor,
    /// Expert bias b (a buffer: affects selection only, never the gate weights).
    pub expert_bias: Tensor,
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
    n_ffn: i64,
    n_total: i64,
    top_k: i64,
    gamma: f64,
    /// The routed experts whose weights this rank holds (all of them without expert
    /// parallelism).
    pub local: Range<i64>,
}

/// What the MoE did, for metrics and (later) the expert-bias controller.
#[derive(Debug)]
pub struct MoeOutput {
    /// The MoE branch output, batch x seq x hidden.
    pub output: Tensor,
    /// Selections per expert (N FFN then Z zero), i64, summed over the tokens.
    pub selections: Tensor,
    /// Router probabilities p, tokens x (N + Z), fp32 (for the load-balance loss).
    pub probs: Tensor,
}

impl Moe {
    fn new(p: &Path, c: &ModelConfig, local: Range<i64>) -> Self {
        let (n, z) = (c.n_routed_experts as i64, c.zero_expert_num as i64);
        let (h, i) = (c.hidden_size as i64, c.expert_ffn_hidden_size as i64);
        let router = p.sub("router");
        let experts = p.sub("experts");
        Self {
            router: matrix(&router, "classifier", (n + z) as usize, c.hidden_size),
            expert_bias: router.zeros_no_train("e_score_correction_bias", &[n + z]),
            gate_proj: expert_var(&experts, "gate_proj", [n, i, h], &local),
            up_proj: expert_var(&experts, "up_proj", [n, i, h], &local),
            down_proj: expert_var(&experts, "down_proj", [n, h, i], &local),
            n_ffn: n,
            n_total: n + z,
            top_k: c.moe_topk as i64,
            gamma: c.routed_scaling_factor,
            local,
        }
    }

    /// Router probabilities p (tokens x (N + Z), fp32) of `x` (tokens x hidden) and the
    /// top-K choice of p + b (tokens x K; the bias only selects).
    pub fn route(&self, x: &Tensor) -> (Tensor, Tensor) {
        let probs = linear(&x.to_kind(Kind::Float), &self.router).softmax(-1, Kind::Float);
        let (_, choice) = (probs.detach() + &self.expert_bias).topk(self.top_k, -1, true, true);
        (probs, choice)
    }

    /// Gate weights gamma * p of the chosen experts (tokens x K).
    pub fn gate_weights(&self, probs: &Tensor, choice: &Tensor) -> Tensor {
        probs.gather(1, choice, false) * self.gamma
    }

    /// The slots of `choice` grouped by expert (zero experts get no rows).
    pub fn dispatch(&self, choice: &Tensor) -> ExpertDispatch {
        ExpertDispatch::new(choice, self.n_ffn, self.n_total)
    }

    /// Mask of the choices that are FFN experts, in `kind`.
    pub fn ffn_mask(&self, choice: &Tensor, kind: Kind) -> Tensor {
        ffn_choice_mask(choice, self.n_ffn, kind)
    }

    /// This rank's experts on expert-major rows: `counts[j]` rows for local expert j.
    pub fn local_experts(&self, rows: &Tensor, counts: &[i64]) -> Tensor {
        let kind = rows.kind();
        grouped_swiglu(
            rows,
            counts,
            &self.gate_proj.to_kind(kind),
            &self.up_proj.to_kind(kind),
            &self.down_proj.to_kind(kind),
        )
    }

    /// Routes `u` (tokens x hidden) and sends its FFN-expert rows on their way to the
    /// experts' owners (zero-computation experts never leave: they are the identity).
    pub fn route_and_send<X: MoeExchange>(
        &self,
        u: &Tensor,
        ex: &mut X,
    ) -> Result<Routed, X::Error> {
        let (probs, choice) = self.route(u);
        let dispatch = self.dispatch(&choice);
        ex.send(&dispatch, dispatch.gather(u))?;
        Ok(Routed {
            probs,
            choice,
            dispatch,
        })
    }

    /// This rank's experts on the rows that arrived; their outputs start back.
    pub fn compute_experts<X: MoeExchange>(&self, ex: &mut X) -> Result<(), X::Error> {
        let (rows, counts) = ex.receive()?;
        ex.send_back(self.local_experts(&rows, &counts))
    }

    /// `MoE(u) = sum_{selected FFN i} g_i FFN_i(u) + (sum_{selected zero i} g_i) u` once
    /// the expert outputs are back, with gate weights `g = gamma * p` (tokens x hidden).
    pub fn combine<X: MoeExchange>(
        &self,
        routed: &Routed,
        u: &Tensor,
        ex: &mut X,
    ) -> Result<Tensor, X::Error> {
        let returned = ex.returned()?;
        let weights = self.gate_weights(&routed.probs, &routed.choice);
        let is_ffn = self.ffn_mask(&routed.choice, Kind::Float);
        Ok(routed.dispatch.combine(&returned, &weights, &is_ffn, u))
    }

    /// The MoE on one rank that holds every expert.
    pub fn forward(&self, u: &Tensor) -> MoeOutput {
        assert_eq!(
            self.local,
            0..self.n_ffn,
            "Moe::forward needs every expert; expert-parallel ranks run the MoE through the \
             parallel schedule"
        );
        let shape = u.size();
        let hidden = shape[shape.len() - 1];
        let x = u.reshape([-1, hidden]);
        let ex = &mut Local::default();
        let routed = infallible(self.route_and_send(&x, ex));
        infallible(self.compute_experts(ex));
        let output = infallible(self.combine(&routed, &x, ex)).view(shape.as_slice());
        MoeOutput {
            output,
            selections: routed.dispatch.selections,
            probs: routed.probs,
        }
    }
}

/// A MoE branch between routing and combine: what the router chose.
#[derive(Debug)]
pub struct Routed {
    /// Router probabilities p, tokens x (N + Z), fp32.
    pub probs: Tensor,
    choice: Tensor,
    dispatch: ExpertDispatch,
}

/// How a MoE layer's rows reach their experts and come back. The layer calls it in the
/// order data flows (send, receive, send back, returned); what happens in between is the
/// implementation's: nothing at all in a process holding every expert (`Local`), an
/// all-to-all over the expert-parallel ranks with graph cuts for the segmented backward
/// (the trainer's parallel schedule). Single Batch Overlap (section 1) is the layer
/// computing FFN0 between send and receive, and MLA1 and FFN1 between send back and
/// returned.
pub trait MoeExchange {
    /// What a failed exchange reports.
    type Error;
    /// A tensor at a graph cut: where the backward of what follows starts (a leaf that
    /// collects its gradient when training through a schedule; itself otherwise).
    fn cut(&mut self, t: &Tensor) -> Tensor;
    /// Starts moving `rows` (the FFN-expert rows of `dispatch`, grouped by expert).
    fn send(&mut self, dispatch: &ExpertDispatch, rows: Tensor) -> Result<(), Self::Error>;
    /// The rows this rank's experts compute, grouped by local expert, with the rows per
    /// local expert.
    fn receive(&mut self) -> Result<(Tensor, Vec<i64>), Self::Error>;
    /// Starts moving the experts' outputs (in the order `receive` gave) back.
    fn send_back(&mut self, outputs: Tensor) -> Result<(), Self::Error>;
    /// Lets an exchange in flight progress (between pieces of compute).
    fn progress(&mut self);
    /// The expert outputs of this rank's rows, in the order they were sent.
    fn returned(&mut self) -> Result<Tensor, Self::Error>;
}

/// The exchange of a process that holds every expert: rows stay where they are and
/// nothing is cut, so plain autograd sees one graph.
#[derive(Debug, Default)]
pub struct Local {
    rows: Option<(Tensor, Vec<i64>)>,
    outputs: Option<Tensor>,
}

impl MoeExchange for Local {
    type Error = std::convert::Infallible;

    fn cut(&mut self, t: &Tensor) -> Tensor {
        t.shallow_clone()
    }

    fn send(&mut self, dispatch: &ExpertDispatch, rows: Tensor) -> Result<(), Self::Error> {
        self.rows = Some((rows, dispatch.counts.clone()));
        Ok(())
    }

    fn receive(&mut self) -> Result<(Tensor, Vec<i64>), Self::Error> {
        Ok(self
            .rows
            .take()
            .expect("the layer sends before it receives"))
    }

    fn send_back(&mut self, outputs: Tensor) -> Result<(), Self::Error> {
        self.outputs = Some(outputs);
        Ok(())
    }

    fn progress(&mut self) {}

    fn returned(&mut self) -> Result<Tensor, Self::Error> {
        Ok(self
            .outputs
            .take()
            .expect("the layer sends back before it combines"))
    }
}

fn infallible<T>(r: Result<T, std::convert::Infallible>) -> T {
    match r {
        Ok(v) => v,
        Err(never) => match never {},
    }
}

/// One shortcut-connected MoE layer (section 1).
#[derive(Debug)]
pub struct ScMoeLayer {
    norm_in: [RmsNorm; 2],
    norm_post: [RmsNorm; 2],
    mla: [Mla; 2],
    ffn: [SwiGlu; 2],
    /// The layer's MoE branch.
    pub moe: Moe,
}

impl ScMoeLayer {
    fn new(p: &Path, c: &ModelConfig, local: Range<i64>) -> Self {
        let (h, eps) = (c.hidden_size, c.rms_norm_eps);
        let norm = |name: &str, i: usize| RmsNorm::new(&p.sub(name).sub(i), h, eps);
        Self {
            norm_in: [norm("input_layernorm", 0), norm("input_layernorm", 1)],
            norm_post: [
                norm("post_attention_layernorm", 0),
                norm("post_attention_layernorm", 1),
            ],
            mla: [
                Mla::new(&p.sub("self_attn").sub(0), c),
                Mla::new(&p.sub("self_attn").sub(1), c),
            ],
            ffn: [
                SwiGlu::new(&p.sub("mlps").sub(0), h, c.ffn_hidden_size),
                SwiGlu::new(&p.sub("mlps").sub(1), h, c.ffn_hidden_size),
            ],
            moe: Moe::new(&p.sub("mlp"), c, local),
        }
    }

    /// The layer on `x` (batch x seq x hidden), moving the MoE's rows through `ex`;
    /// also returns what the MoE did. Section 1, in the order it runs:
    ///
    /// ```text
    /// h1 = x + MLA0(norm_in0(x));  u = norm_post0(h1)
    /// route u, send its FFN-expert rows           (dispatch starts)
    /// h2 = h1 + FFN0(u)                            (while the dispatch moves)
    /// experts on what arrived, send back           (combine starts)
    /// h3 = h2 + MLA1(norm_in1(h2))
    /// out = h3 + FFN1(norm_post1(h3)) + MoE(u)     (the combine joins last)
    /// ```
    pub fn forward_with<X: MoeExchange>(
        &self,
        x: &Tensor,
        rope: &Rope,
        mask: Option<&Tensor>,
        ex: &mut X,
    ) -> Result<(Tensor, MoeOutput), X::Error> {
        let shape = x.size();
        let hidden = shape[shape.len() - 1];
        let h1 = x + self.mla[0].forward(&self.norm_in[0].forward(x), rope, mask);
        let u = self.norm_post[0].forward(&h1);
        let routed = self.moe.route_and_send(&u.reshape([-1, hidden]), ex)?;
        // What the rest of the layer reads of h1, u and p (a cut: the backward of the
        // dense branch and the combine runs before that of attention 0 and the router).
        let (h1, u) = (ex.cut(&h1), ex.cut(&u));
        let routed = Routed {
            probs: ex.cut(&routed.probs),
            ..routed
        };
        let h2 = &h1 + self.ffn[0].forward(&u);
        self.moe.compute_experts(ex)?;
        let h3 = &h2 + self.mla[1].forward(&self.norm_in[1].forward(&h2), rope, mask);
        ex.progress();
        let f1 = &h3 + self.ffn[1].forward(&self.norm_post[1].forward(&h3));
        let m = self
            .moe
            .combine(&routed, &u.reshape([-1, hidden]), ex)?
            .view(shape.as_slice());
        let out = f1 + &m;
        let moe = MoeOutput {
            output: m,
            selections: routed.dispatch.selections,
            probs: routed.probs,
        };
        Ok((out, moe))
    }

    /// The layer on `x` in a process that holds every expert.
    pub fn forward(&self, x: &Tensor, rope: &Rope, mask: Option<&Tensor>) -> (Tensor, MoeOutput) {
        infallible(self.forward_with(x, rope, mask, &mut Local::default()))
    }
}

/// The multi-token-prediction layer (section 10): from the main model's last hidden
/// state at t and the embedding of token t+1, predict token t+2 with one dense layer
/// (MLA + SwiGLU, no MoE), its own final norm, and the shared embedding and head.
/// Names follow the released checkpoint (`model.mtp.layers.0.eh_proj.weight`, ...).
#[derive(Debug)]
pub struct MtpLayer {
    eh_proj: Tensor,
    enorm: RmsNorm,
    hnorm: RmsNorm,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    self_attn: Mla,
    mlp: SwiGlu,
    norm: RmsNorm,
}

impl MtpLayer {
    fn new(p: &Path, c: &ModelConfig) -> Self {
        let (h, eps) = (c.hidden_size, c.rms_norm_eps);
        let layer = p.sub("layers").sub(0);
        Self {
            eh_proj: matrix(&layer, "eh_proj", h, 2 * h),
            enorm: RmsNorm::new(&layer.sub("enorm").sub("m"), h, eps),
            hnorm: RmsNorm::new(&layer.sub("hnorm").sub("m"), h, eps),
            input_layernorm: RmsNorm::new(&layer.sub("input_layernorm"), h, eps),
            post_attention_layernorm: RmsNorm::new(&layer.sub("post_attention_layernorm"), h, eps),
            self_attn: Mla::new(&layer.sub("self_attn"), c),
            mlp: SwiGlu::new(
                &layer.sub("transformer_layer").sub("mlp"),
                h,
                c.ffn_hidden_size,
            ),
            norm: RmsNorm::new(&p.sub("norm"), h, eps),
        }
    }

    /// `h = eh_proj([enorm(emb_next); hnorm(h_main)])`, the dense layer, the final norm.
    fn forward(
        &self,
        emb_next: &Tensor,
        h_main: &Tensor,
        rope: &Rope,
        mask: Option<&Tensor>,
    ) -> Tensor {
        let joined = Tensor::cat(
            &[self.enorm.forward(emb_next), self.hnorm.forward(h_main)],
            -1,
        );
        let x = linear(&joined, &self.eh_proj);
        let x = &x
            + self
                .self_attn
                .forward(&self.input_layernorm.forward(&x), rope, mask);
        let x = &x + self.mlp.forward(&self.post_attention_layernorm.forward(&x));
        self.norm.forward(&x)
    }
}

/// Embedding, ScMoE layers, final norm and an untied head.
#[derive(Debug)]
pub struct LongcatModel {
    embed_tokens: Tensor,
    /// The layers, in order.
    pub layers: Vec<ScMoeLayer>,
    norm: RmsNorm,
    lm_head: Tensor,
    /// The optional multi-token-prediction layer.
    pub mtp: Option<MtpLayer>,
    rope: Rope,
    compute_kind: Kind,
}

/// Outputs of a forward pass.
#[derive(Debug)]
pub struct ModelOutput {
    /// Next-token logits, batch x seq x vocab, fp32.
    pub logits: Tensor,
    /// The last layer's hidden state before the final norm (for the hidden z-loss).
    pub last_hidden: Tensor,
    /// Per layer, what the MoE did (selections per expert, router probabilities).
    pub moe: Vec<MoeOutput>,
}

impl LongcatModel {
    /// Declares the parameters under `root` by name and shape, without their values
    /// (`crate::init` draws them: `InitPlan::fill_all` for a whole model), and a zero
    /// expert bias. The RoPE tables are made on `device`, where the parameters are.
    pub fn new(
        root: &Path,
        c: &ModelConfig,
        max_seq_len: usize,
        compute_kind: Kind,
        device: tch::Device,
    ) -> Self {
        Self::with_experts(
            root,
            c,
            max_seq_len,
            compute_kind,
            device,
            0..c.n_routed_experts,
        )
    }

    /// `new` holding only the routed experts `local` of every layer (an expert-parallel
    /// rank); `crate::init` gives every value that of `new`'s whole tensor.
    pub fn with_experts(
        root: &Path,
        c: &ModelConfig,
        max_seq_len: usize,
        compute_kind: Kind,
        device: tch::Device,
        local: Range<usize>,
    ) -> Self {
        let local = local.start as i64..local.end as i64;
        let model = root.sub("model");
        let embed_tokens = param(
            &model.sub("embed_tokens"),
            "weight",
            &[c.vocab_size as i64, c.hidden_size as i64],
        );
        let layers = (0..c.num_layers)
            .map(|i| ScMoeLayer::new(&model.sub("layers").sub(i), c, local.clone()))
            .collect();
        let norm = RmsNorm::new(&model.sub("norm"), c.hidden_size, c.rms_norm_eps);
        let lm_head = matrix(root, "lm_head", c.vocab_size, c.hidden_size);
        // Created last, so enabling it leaves every other initial value unchanged.
        let mtp = (c.mtp_layers > 0).then(|| MtpLayer::new(&model.sub("mtp"), c));
        let rope = Rope::new(c.qk_rope_head_dim, max_seq_len, c.rope_theta, device);
        Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            mtp,
            rope,
            compute_kind,
        }
    }

    /// MTP logits (batch x (seq - 1) x vocab, fp32): position t predicts token t+2 from
    /// the main model's last hidden state at t and the embedding of token t+1. None
    /// without an MTP layer.
    pub fn forward_mtp(&self, tokens: &Tensor, main: &ModelOutput) -> Option<Tensor> {
        self.forward_mtp_masked(tokens, main, None)
    }

    /// `forward_mtp` with an attention mask over all `seq` positions (the MTP layer
    /// uses its first `seq - 1` rows and columns).
    pub fn forward_mtp_masked(
        &self,
        tokens: &Tensor,
        main: &ModelOutput,
        mask: Option<&Tensor>,
    ) -> Option<Tensor> {
        let mtp = self.mtp.as_ref()?;
        let seq = tokens.size()[1];
        let next = tokens.narrow(1, 1, seq - 1);
        let emb_next = Tensor::embedding(&self.embed_tokens, &next, -1, false, false)
            .to_kind(self.compute_kind);
        let h_main = main.last_hidden.narrow(1, 0, seq - 1);
        let mask = mask.map(|m| m.narrow(2, 0, seq - 1).narrow(3, 0, seq - 1));
        let hidden = mtp.forward(&emb_next, &h_main, &self.rope, mask.as_ref());
        Some(linear(&hidden, &self.lm_head).to_kind(Kind::Float))
    }

    /// The kind the model computes in (fp32 or bf16).
    pub fn compute_kind(&self) -> Kind {
        self.compute_kind
    }

    /// Token embeddings of `tokens` in the compute kind.
    pub fn embed(&self, tokens: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed_tokens, tokens, -1, false, false).to_kind(self.compute_kind)
    }

    /// Next-token logits (fp32) from the last layer's output.
    pub fn head(&self, h: &Tensor) -> Tensor {
        linear(&self.norm.forward(h), &self.lm_head).to_kind(Kind::Float)
    }

    /// The rotary tables.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// Logits for `tokens` (batch x seq, i64).
    pub fn forward(&self, tokens: &Tensor) -> ModelOutput {
        self.forward_masked(tokens, None)
    }

    /// `forward` with an attention mask (batch x 1 x seq x seq, bool, true = attend)
    /// in place of the causal one.
    pub fn forward_masked(&self, tokens: &Tensor, mask: Option<&Tensor>) -> ModelOutput {
        let mut h = self.embed(tokens);
        let mut moe = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let (out, m) = layer.forward(&h, &self.rope, mask);
            h = out;
            moe.push(m);
        }
        let logits = self.head(&h);
        ModelOutput {
            logits,
            last_hidden: h,
            moe,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::ModelConfig;
    use tch::{nn::VarStore, Device};

    fn config() -> ModelConfig {
        crate::recipe::tests_support::model_config(4, 2, 3, 2, 2)
    }

    fn moe(c: &ModelConfig) -> (VarStore, Moe) {
        tch::manual_seed(11);
        let vs = VarStore::new(Device::Cpu);
        let m = Moe::new(&vs.root(), c, 0..c.n_routed_experts as i64);
        crate::init::InitPlan::plain(11, c.initializer_range, 0..c.n_routed_experts).fill_all(&vs);
        (vs, m)
    }

    #[test]
    fn mla_scale_factors_are_sqrt_width_over_rank() {
        let c = config();
        let vs = VarStore::new(Device::Cpu);
        let mla = Mla::new(&vs.root(), &c);
        assert_eq!(mla.alpha_q, (32.0f64 / 8.0).sqrt());
        assert_eq!(mla.alpha_kv, (32.0f64 / 2.0).sqrt());
        assert_eq!(mla.alpha_kv, 4.0);
    }

    #[test]
    fn zero_experts_return_their_input_times_their_gate() {
        let c = config();
        let (_vs, m) = moe(&c);
        // A bias that only zero experts can win: every selection is a zero expert.
        let mut bias = m.expert_bias.shallow_clone();
        tch::no_grad(|| {
            bias.copy_(&Tensor::from_slice(&[
                -10.0f32, -10.0, -10.0, -10.0, 10.0, 10.0,
            ]))
        });
        let m = Moe { top_k: 2, ..m };
        let u = Tensor::randn([3, 5, 32], (Kind::Float, Device::Cpu));
        let out = m.forward(&u);
        let x = u.reshape([-1, 32]);
        let probs = linear(&x, &m.router).softmax(-1, Kind::Float);
        let gate = probs.narrow(1, 4, 2).sum_dim_intlist(-1, true, Kind::Float) * 1.5;
        let expected = (x * gate).view([3, 5, 32]);
        assert!(out.output.allclose(&expected, 1e-6, 1e-6, false));
        assert_eq!(
            Vec::<i64>::try_from(&out.selections).unwrap(),
            vec![0, 0, 0, 0, 15, 15]
        );
    }

    #[test]
    fn without_zero_experts_and_k_equal_n_the_moe_is_the_dense_weighted_sum() {
        let c = ModelConfig {
            zero_expert_num: 0,
            moe_topk: 4,
            target_ffn_experts: None,
            ..config()
        };
        let (_vs, m) = moe(&c);
        let u = Tensor::randn([2, 7, 32], (Kind::Float, Device::Cpu));
        let out = m.forward(&u).output;
        let x = u.reshape([-1, 32]);
        let probs = linear(&x, &m.router).softmax(-1, Kind::Float);
        let mut dense = Tensor::zeros_like(&x);
        for e in 0..4 {
            let h = linear(&x, &m.gate_proj.get(e)).silu() * linear(&x, &m.up_proj.get(e));
            dense += linear(&h, &m.down_proj.get(e)) * probs.narrow(1, e, 1) * 1.5;
        }
        let diff = (out - dense.view([2, 7, 32])).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "max difference {diff}");
    }

    #[test]
    fn gamma_scales_the_moe_output() {
        let c = config();
        let (_vs, m1) = moe(&c);
        let (_vs2, m3) = moe(&ModelConfig {
            routed_scaling_factor: 4.5,
            ..c
        });
        // The same weights in both (other tests draw from the global RNG concurrently).
        tch::no_grad(|| {
            for (dst, src) in [
                (&m3.router, &m1.router),
                (&m3.gate_proj, &m1.gate_proj),
                (&m3.up_proj, &m1.up_proj),
                (&m3.down_proj, &m1.down_proj),
            ] {
                dst.shallow_clone().copy_(src);
            }
        });
        let u = Tensor::randn([2, 6, 32], (Kind::Float, Device::Cpu));
        let a = m1.forward(&u).output;
        let b = m3.forward(&u).output;
        let diff = (b - a * 3.0).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "max difference {diff}");
    }

    #[test]
    fn expert_bias_changes_selection_but_not_weights() {
        let c = ModelConfig {
            zero_expert_num: 0,
            moe_topk: 1,
            target_ffn_experts: None,
            ..config()
        };
        let (_vs, m) = moe(&c);
        let u = Tensor::randn([1, 4, 32], (Kind::Float, Device::Cpu));
        let mut bias = m.expert_bias.shallow_clone();
        // Force expert 2 for every token: the output must be g_2 * FFN_2 with g from p.
        tch::no_grad(|| bias.copy_(&Tensor::from_slice(&[0.0f32, 0.0, 5.0, 0.0])));
        let out = m.forward(&u);
        let x = u.reshape([-1, 32]);
        let probs = linear(&x, &m.router).softmax(-1, Kind::Float);
        let h = linear(&x, &m.gate_proj.get(2)).silu() * linear(&x, &m.up_proj.get(2));
        let expected = linear(&h, &m.down_proj.get(2)) * probs.narrow(1, 2, 1) * 1.5;
        assert!(out
            .output
            .view([4, 32])
            .allclose(&expected, 1e-5, 1e-6, false));
        assert_eq!(
            Vec::<i64>::try_from(&out.selections).unwrap(),
            vec![0, 0, 4, 0]
        );
    }

    #[test]
    fn mtp_position_t_sees_tokens_up_to_t_plus_one_only() {
        let c = ModelConfig {
            mtp_layers: 1,
            ..config()
        };
        tch::manual_seed(5);
        let vs = VarStore::new(Device::Cpu);
        let model = LongcatModel::new(&vs.root(), &c, 16, Kind::Float, Device::Cpu);
        crate::init::InitPlan::plain(5, c.initializer_range, 0..c.n_routed_experts).fill_all(&vs);
        let tokens = Tensor::randint(256, [1, 10], (Kind::Int64, Device::Cpu));
        let logits = model.forward_mtp(&tokens, &model.forward(&tokens)).unwrap();
        assert_eq!(logits.size(), vec![1, 9, 300]);
        // Token 6 is the "next" input of position 5: positions <= 4 must not move.
        let changed = tokens.copy();
        let _ = changed.get(0).get(6).fill_(7);
        let again = model
            .forward_mtp(&changed, &model.forward(&changed))
            .unwrap();
        let early = (logits.narrow(1, 0, 5) - again.narrow(1, 0, 5)).abs().max();
        let at = (logits.narrow(1, 5, 1) - again.narrow(1, 5, 1)).abs().max();
        assert!(early.double_value(&[]) < 1e-5, "{early}");
        assert!(at.double_value(&[]) > 1e-4, "{at}");
        let names: Vec<String> = vs.variables().into_keys().collect();
        assert!(names.contains(&"model.mtp.layers.0.eh_proj.weight".to_string()));
        assert!(names
            .contains(&"model.mtp.layers.0.transformer_layer.mlp.down_proj.weight".to_string()));
        assert!(names.contains(&"model.mtp.norm.weight".to_string()));
    }

    #[test]
    fn document_mask_makes_a_packed_document_see_only_itself() {
        let c = config();
        tch::manual_seed(6);
        let vs = VarStore::new(Device::Cpu);
        let model = LongcatModel::new(&vs.root(), &c, 16, Kind::Float, Device::Cpu);
        crate::init::InitPlan::plain(5, c.initializer_range, 0..c.n_routed_experts).fill_all(&vs);
        // Document A (4 tokens, ending with the end-of-document id 299), then document B.
        let a = [5i64, 17, 42, 299];
        let b = [7i64, 8, 9, 10, 11, 12];
        let packed = Tensor::from_slice(&[&a[..], &b[..]].concat()).view([1, 10]);
        let segments = [0u32, 0, 0, 0, 1, 1, 1, 1, 1, 1];
        let mask = crate::batch::document_mask(&segments, 1, Device::Cpu);
        let alone = model.forward(&Tensor::from_slice(&b).view([1, 6])).logits;
        let masked = model
            .forward_masked(&packed, Some(&mask))
            .logits
            .narrow(1, 4, 6);
        let unmasked = model.forward(&packed).logits.narrow(1, 4, 6);
        // Rotary attention depends on relative positions only, so B at offset 4 with the
        // mask equals B alone up to rounding; without the mask B also attends to A.
        let diff = (&masked - &alone).abs().max().double_value(&[]);
        assert!(
            diff < 1e-4,
            "masked packing differs from the lone document by {diff}"
        );
        let leak = (&unmasked - &alone).abs().max().double_value(&[]);
        assert!(
            leak > 1e-3,
            "without the mask the document should see its neighbour ({leak})"
        );
        // Document A is unaffected either way (causality).
        let a_masked = model
            .forward_masked(&packed, Some(&mask))
            .logits
            .narrow(1, 0, 4);
        let a_alone = model.forward(&Tensor::from_slice(&a).view([1, 4])).logits;
        assert!((a_masked - a_alone).abs().max().double_value(&[]) < 1e-4);
    }

    #[test]
    fn model_is_causal_and_gradients_reach_every_parameter() {
        let c = config();
        tch::manual_seed(5);
        let vs = VarStore::new(Device::Cpu);
        let model = LongcatModel::new(&vs.root(), &c, 16, Kind::Float, Device::Cpu);
        crate::init::InitPlan::plain(5, c.initializer_range, 0..c.n_routed_experts).fill_all(&vs);
        let tokens = Tensor::randint(256, [2, 10], (Kind::Int64, Device::Cpu));
        let out = model.forward(&tokens);
        assert_eq!(out.logits.size(), vec![2, 10, 300]);
        // Changing a later token must not change earlier logits. Only up to rounding: the
        // changed token may be routed to other experts, which changes the row counts of
        // the grouped expert matmuls and so the blocking of the BLAS kernels.
        let changed = tokens.copy();
        let _ = changed.get(0).get(7).fill_(3);
        let out2 = model.forward(&changed);
        let early = (out.logits.narrow(1, 0, 7) - out2.logits.narrow(1, 0, 7))
            .abs()
            .max();
        let late = (out.logits.narrow(1, 7, 3) - out2.logits.narrow(1, 7, 3))
            .abs()
            .max();
        assert!(
            early.double_value(&[]) < 1e-5,
            "earlier positions moved by {early}"
        );
        assert!(
            late.double_value(&[]) > 1e-3,
            "later positions did not change: {late}"
        );
        out.logits.square().mean(Kind::Float).backward();
        let mut names: Vec<_> = vs.variables().into_iter().collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t) in names.iter().filter(|(_, t)| t.requires_grad()) {
            let g = t.grad();
            assert!(g.defined(), "{name} got no gradient");
            if !name.contains("experts") {
                assert!(
                    g.abs().sum(Kind::Float).double_value(&[]) > 0.0,
                    "{name} has a zero gradient"
                );
            }
        }
    }
}
