"""Baseline of `catapult bench train` (and `scripts/bench-train`): the same LongCat-Flash
model, written the plain way in PyTorch eager (MLA, dense SwiGLU, a softmax router over
FFN + zero experts whose bias a sign rule moves to hold the recipe's FFN experts per token,
a loop over experts), trained with torch's AdamW on random tokens.
With `compile`, the model is `torch.compile`d (inductor, the default mode) and the same
loop trains it. Prints one JSON line: the median tokens/s over the steps after WARMUP,
every timed step's rate, and the seconds before the first timed step (compilation).

Usage: eager_longcat.py RESOLVED_RECIPE_JSON STEPS [eager|compile] [WARMUP]
"""
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def rope(x, cos, sin):
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MLA(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, nh = c["hidden_size"], c["num_attention_heads"]
        self.nh, self.nope, self.rd, self.vd = nh, c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
        self.kv_rank = c["kv_lora_rank"]
        self.q_a = nn.Linear(h, c["q_lora_rank"], bias=False)
        self.q_norm = RMSNorm(c["q_lora_rank"], 1e-6)
        self.q_b = nn.Linear(c["q_lora_rank"], nh * (self.nope + self.rd), bias=False)
        self.kv_a = nn.Linear(h, self.kv_rank + self.rd, bias=False)
        self.kv_norm = RMSNorm(self.kv_rank, 1e-6)
        self.kv_b = nn.Linear(self.kv_rank, nh * (self.nope + self.vd), bias=False)
        self.o = nn.Linear(nh * self.vd, h, bias=False)
        self.alpha_q = math.sqrt(h / c["q_lora_rank"])
        self.alpha_kv = math.sqrt(h / self.kv_rank)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q = (self.q_b(self.q_norm(self.q_a(x))) * self.alpha_q).view(b, s, self.nh, -1).transpose(1, 2)
        ckv = self.kv_a(x)
        latent = self.kv_norm(ckv[..., : self.kv_rank]) * self.alpha_kv
        k_rope = ckv[..., self.kv_rank :].view(b, 1, s, self.rd)
        kv = self.kv_b(latent).view(b, s, self.nh, -1).transpose(1, 2)
        q = torch.cat([q[..., : self.nope], rope(q[..., self.nope :], cos, sin)], -1)
        k = torch.cat([kv[..., : self.nope], rope(k_rope, cos, sin).expand(b, self.nh, s, self.rd)], -1)
        v = kv[..., self.nope :]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.gate = nn.Linear(h, i, bias=False)
        self.up = nn.Linear(h, i, bias=False)
        self.down = nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n, self.z, self.k = c["n_routed_experts"], c["zero_expert_num"], c["moe_topk"]
        self.gamma = c["routed_scaling_factor"]
        self.router = nn.Linear(c["hidden_size"], self.n + self.z, bias=False)
        self.register_buffer("bias", torch.zeros(self.n + self.z))
        self.experts = nn.ModuleList(SwiGLU(c["hidden_size"], c["expert_ffn_hidden_size"]) for _ in range(self.n))
        self.target = c.get("target_ffn_experts") or self.k
        self.ffn_choices = 0  # FFN-expert choices and tokens seen (reported)
        self.tokens = 0
        self.step_choices = 0  # this step's, for the bias update
        self.step_tokens = 0

    def forward(self, u):
        x = u.reshape(-1, u.shape[-1])
        p = self.router(x.float()).softmax(-1)
        idx = torch.topk(p.detach() + self.bias, self.k, dim=-1).indices
        w = p.gather(1, idx) * self.gamma
        out = x * (w * (idx >= self.n)).sum(-1, keepdim=True)
        chosen = int((idx < self.n).sum())
        self.step_choices += chosen
        self.step_tokens += x.shape[0]
        for e in range(self.n):
            token, slot = torch.where(idx == e)
            if token.numel():
                out = out.index_add(0, token, self.experts[e](x[token]) * w[token, slot, None])
        return out.view_as(u)

    @torch.no_grad()
    def update_bias(self, rate=1e-2):
        """Holds FFN experts per token near the target, as the trainer's controller does
        (the sign rule: FFN experts' bias down when above it, up when below)."""
        per_token = self.step_choices / max(self.step_tokens, 1)
        self.bias[: self.n] -= rate * (1.0 if per_token > self.target else -1.0)
        self.ffn_choices += self.step_choices
        self.tokens += self.step_tokens
        self.step_choices = self.step_tokens = 0


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, eps = c["hidden_size"], c["rms_norm_eps"]
        self.norm_in = nn.ModuleList(RMSNorm(h, eps) for _ in range(2))
        self.norm_post = nn.ModuleList(RMSNorm(h, eps) for _ in range(2))
        self.mla = nn.ModuleList(MLA(c) for _ in range(2))
        self.ffn = nn.ModuleList(SwiGLU(h, c["ffn_hidden_size"]) for _ in range(2))
        self.moe = MoE(c)

    def forward(self, x, cos, sin):
        h1 = x + self.mla[0](self.norm_in[0](x), cos, sin)
        u = self.norm_post[0](h1)
        m = self.moe(u)
        h2 = h1 + self.ffn[0](u)
        h3 = h2 + self.mla[1](self.norm_in[1](h2), cos, sin)
        return h3 + self.ffn[1](self.norm_post[1](h3)) + m


class Model(nn.Module):
    def __init__(self, c, seq_len):
        super().__init__()
        self.embed = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(Layer(c) for _ in range(c["num_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        rd = c["qk_rope_head_dim"]
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, rd, 2).float() / rd))
        freqs = torch.arange(seq_len).float()[:, None] * inv[None, :]
        self.register_buffer("cos", freqs.cos())
        self.register_buffer("sin", freqs.sin())
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=c["initializer_range"])

    def forward(self, tokens):
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h, self.cos, self.sin)
        return self.head(self.norm(h))


def main():
    recipe = json.loads(open(sys.argv[1]).read())
    steps = int(sys.argv[2])
    mode = sys.argv[3] if len(sys.argv) > 3 else "eager"
    warmup = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    if mode not in ("eager", "compile") or steps <= warmup:
        sys.exit(f"usage: eager_longcat.py RECIPE_JSON STEPS [eager|compile] [WARMUP < STEPS]; got {sys.argv[1:]}")
    threads = recipe["system"]["threads"]
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(recipe["seed"])
    c, t, seq = recipe["model"], recipe["train"], recipe["data"]["seq_len"]
    model = Model(c, seq)
    # The optimizer holds the parameters themselves; the compiled wrapper shares them.
    run = torch.compile(model) if mode == "compile" else model
    opt = torch.optim.AdamW(model.parameters(), lr=t["lr"], betas=(t["beta1"], t["beta2"]),
                            eps=t["adam_eps"], weight_decay=t["weight_decay"])
    micro = t["global_batch_size"] // t["micro_batch_size"]
    vocab = min(c["vocab_size"], 257)
    rates = []
    began = time.perf_counter()
    first_timed = None
    for step in range(steps):
        start = time.perf_counter()
        for _ in range(micro):
            tokens = torch.randint(0, vocab, (t["micro_batch_size"], seq + 1))
            logits = run(tokens[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
            (loss / micro).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        opt.zero_grad()
        for layer in model.layers:
            layer.moe.update_bias()
        if step == warmup:
            first_timed = start - began
        if step >= warmup:
            rates.append(t["global_batch_size"] * seq / (time.perf_counter() - start))
    moes = [layer.moe for layer in model.layers]
    seen = sum(m.tokens for m in moes)
    ffn = sum(m.ffn_choices for m in moes) / seen if seen else None
    print(json.dumps({"impl": f"pytorch-{mode}", "tokens_per_s": statistics.median(rates),
                      "ffn_experts_per_token": ffn,
                      "rates": rates, "steps": steps, "warmup_s": first_timed}))


if __name__ == "__main__":
    main()
