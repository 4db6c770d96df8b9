//! Width-scaled hyperparameter transfer (longcat-methods section 7): hyperparameters
//! tuned on a narrow proxy (width n_p) carried to the target width n_t with
//! s = n_t / n_p, per parameter group, under the Adam rules of Everett et al. 2024 for
//! the standard parameterization:
//!
//! | group                                  | init std          | learning rate |
//! |----------------------------------------|-------------------|---------------|
//! | embedding                              | sigma (same)      | eta (same)    |
//! | attention, dense FFN, experts, router  | sigma / sqrt(s)   | eta / s       |
//! | head (the unembedding)                 | sigma / sqrt(s)   | eta / s       |
//! | norms (RMSNorm gains)                  | 1 (constant)      | eta (same)    |
//!
//! The router is a hidden matrix (its fan-in is the width), so it follows the hidden
//! rule. Norm gains are width-independent vectors initialized to 1: they keep the
//! proxy's rate, as the embedding does. A group override tuned on the proxy replaces
//! sigma or eta for that group before its rule applies.

use crate::groups::Group;
use crate::recipe::{ModelConfig, Recipe};
use crate::sizing::ParamCounts;
use serde::Serialize;
use std::collections::BTreeMap;

/// One row of the transfer table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupHp {
    /// The group.
    pub group: Group,
    /// Its parameters in the target model.
    pub params: u64,
    /// Standard deviation of its normal initialization (None: constant 1, the norms).
    pub init_std: Option<f64>,
    /// Its peak learning rate.
    pub lr: f64,
    /// The rule that produced them.
    pub rule: String,
}

/// Parameters per group, counted from the configuration (equal to the instantiated
/// model's, by `Group::of` of every tensor name).
pub fn group_params(c: &ModelConfig) -> BTreeMap<Group, u64> {
    let p = ParamCounts::of(c);
    let h = c.hidden_size as u64;
    let layers = c.num_layers as u64;
    let mla_norms = (c.q_lora_rank + c.kv_lora_rank) as u64;
    let mla = p.mla_block - mla_norms;
    let mtp = c.mtp_layers as u64;
    let mut m = BTreeMap::new();
    m.insert(Group::Embedding, p.embedding);
    m.insert(Group::Head, c.vocab_size as u64 * h);
    m.insert(Group::Router, layers * p.router);
    m.insert(Group::Experts, p.experts_all);
    m.insert(Group::Attention, (2 * layers + mtp) * mla);
    m.insert(
        Group::DenseFfn,
        2 * layers * p.dense_ffn + mtp * (2 * h * h + p.dense_ffn),
    );
    m.insert(
        Group::Norms,
        layers * (4 * h + 2 * mla_norms) + h + mtp * (5 * h + mla_norms),
    );
    m
}

/// The table for `r`: every group's init std and learning rate, and the rule.
pub fn table(r: &Recipe) -> Vec<GroupHp> {
    let counts = group_params(&r.model);
    let Some(t) = &r.transfer else {
        return Group::ALL
            .iter()
            .map(|&g| GroupHp {
                group: g,
                params: counts[&g],
                init_std: (g != Group::Norms).then_some(r.model.initializer_range),
                lr: r.train.lr,
                rule: "no proxy: the recipe's lr and initializer_range".into(),
            })
            .collect();
    };
    let p = &t.proxy;
    let s = r.model.hidden_size as f64 / p.hidden_size as f64;
    let base_lr = p.lr.unwrap_or(r.train.lr);
    let base_std = p.init_std.unwrap_or(r.model.initializer_range);
    Group::ALL
        .iter()
        .map(|&g| {
            let o = p.groups.get(&g);
            let lr = o.and_then(|o| o.lr).unwrap_or(base_lr);
            let std = o.and_then(|o| o.init_std).unwrap_or(base_std);
            let tuned = if o.is_some() { " (proxy override)" } else { "" };
            let (init_std, lr, rule) = match g {
                Group::Embedding => (
                    Some(std),
                    lr,
                    format!("embedding: same variance, same LR{tuned}"),
                ),
                Group::Norms => (
                    None,
                    lr,
                    format!("norm gains: init 1, same LR (width-independent){tuned}"),
                ),
                Group::Head => (
                    Some(std / s.sqrt()),
                    lr / s,
                    format!("unembedding: variance / s, LR / s (s = {s}){tuned}"),
                ),
                Group::Router => (
                    Some(std / s.sqrt()),
                    lr / s,
                    format!(
                        "router (hidden, fan-in = width): variance / s, LR / s (s = {s}){tuned}"
                    ),
                ),
                _ => (
                    Some(std / s.sqrt()),
                    lr / s,
                    format!("hidden: variance / s, LR / s (s = {s}){tuned}"),
                ),
            };
            GroupHp {
                group: g,
                params: counts[&g],
                init_std,
                lr,
                rule,
            }
        })
        .collect()
}

/// Every group's learning rate relative to the scheduled one (`train.lr` at the peak):
/// the schedule's shape times this factor is the group's rate.
pub fn lr_scales(r: &Recipe) -> BTreeMap<Group, f64> {
    table(r)
        .into_iter()
        .map(|row| (row.group, row.lr / r.train.lr))
        .collect()
}

/// Each group's initial std (the table's; norms, drawn as ones, keep the base).
pub fn init_stds(r: &Recipe) -> BTreeMap<Group, f64> {
    table(r)
        .into_iter()
        .map(|row| (row.group, row.init_std.unwrap_or(r.model.initializer_range)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy target of width 64 transferred from a proxy of width 16 (s = 4), lr 0.01,
    /// init std 0.02, with the router's learning rate tuned separately on the proxy.
    fn toy() -> Recipe {
        let text = "name: toy
model:
  vocab_size: 272
  hidden_size: 64
  num_layers: 2
  num_attention_heads: 2
  q_lora_rank: 32
  kv_lora_rank: 16
  qk_nope_head_dim: 8
  qk_rope_head_dim: 8
  v_head_dim: 8
  ffn_hidden_size: 128
  expert_ffn_hidden_size: 32
  n_routed_experts: 8
  zero_expert_num: 2
  moe_topk: 2
  initializer_range: 0.02
  mtp_layers: 1
transfer:
  proxy:
    hidden_size: 16
    groups:
      router: {lr: 0.004}
data: {path: unused, seq_len: 16}
train: {steps: 1, global_batch_size: 2, micro_batch_size: 2, lr: 0.01}
";
        crate::recipe::parse(text, "toy.yaml", &[]).expect("the toy recipe is valid")
    }

    #[test]
    fn the_table_applies_the_rules_exactly() {
        let t: BTreeMap<Group, GroupHp> = table(&toy()).into_iter().map(|r| (r.group, r)).collect();
        let row = |g| (t[&g].init_std, t[&g].lr);
        assert_eq!(row(Group::Embedding), (Some(0.02), 0.01));
        for g in [
            Group::Attention,
            Group::DenseFfn,
            Group::Experts,
            Group::Head,
        ] {
            assert_eq!(row(g), (Some(0.01), 0.0025), "{g}");
        }
        assert_eq!(row(Group::Router), (Some(0.01), 0.001));
        assert_eq!(row(Group::Norms), (None, 0.01));
        let scales = lr_scales(&toy());
        assert_eq!(scales[&Group::Experts], 0.25);
        assert_eq!(scales[&Group::Embedding], 1.0);
    }

    #[test]
    fn group_counts_equal_the_instantiated_model() {
        let r = toy();
        let built = crate::init::build_model(&r, tch::Device::Cpu);
        let mut counted: BTreeMap<Group, u64> = BTreeMap::new();
        for (name, t) in built.vars.variables() {
            if t.requires_grad() {
                *counted.entry(Group::of(&name)).or_default() += t.numel() as u64;
            }
        }
        assert_eq!(counted, group_params(&r.model));
    }

    #[test]
    fn initialized_tensors_have_their_groups_std() {
        let r = toy();
        let built = crate::init::build_model(&r, tch::Device::Cpu);
        let t: BTreeMap<Group, GroupHp> = table(&r).into_iter().map(|r| (r.group, r)).collect();
        let mut pooled: BTreeMap<Group, Vec<f32>> = BTreeMap::new();
        for (name, v) in built.vars.variables() {
            if v.requires_grad() {
                let values: Vec<f32> = Vec::try_from(v.flatten(0, -1)).unwrap();
                pooled.entry(Group::of(&name)).or_default().extend(values);
            }
        }
        for (g, values) in pooled {
            let n = values.len() as f64;
            let mean = values.iter().map(|&x| x as f64).sum::<f64>() / n;
            let std = (values
                .iter()
                .map(|&x| (x as f64 - mean).powi(2))
                .sum::<f64>()
                / n)
                .sqrt();
            match t[&g].init_std {
                None => assert!(values.iter().all(|&x| x == 1.0), "{g}: norms start at 1"),
                Some(want) => {
                    // The sample std of n normal draws has relative standard error 1/sqrt(2n).
                    let tolerance = 4.0 / (2.0 * n).sqrt();
                    assert!(
                        (std / want - 1.0).abs() < tolerance,
                        "{g}: std {std} vs {want} over {n} values (tolerance {tolerance})"
                    );
                }
            }
        }
    }
}
