//! Recipes for the unit tests of `recipe`: a small valid recipe and ways to break it.
//! Test-only; it knows the module's entry points and nothing outside `recipe`.

use super::{parse, Override, Recipe, RecipeError};

pub(crate) const GOOD: &str = "name: t
model:
  vocab_size: 272
  hidden_size: 64
  num_layers: 1
  num_attention_heads: 2
  q_lora_rank: 32
  kv_lora_rank: 16
  qk_nope_head_dim: 8
  qk_rope_head_dim: 8
  v_head_dim: 8
  ffn_hidden_size: 64
  expert_ffn_hidden_size: 16
  n_routed_experts: 4
  zero_expert_num: 2
  moe_topk: 2
  target_ffn_experts: 1
data:
  path: x
  seq_len: 16
train:
  steps: 10
  global_batch_size: 4
  micro_batch_size: 2
  lr: 0.001
";

pub(crate) fn with(key: &str) -> Result<Recipe, RecipeError> {
    parse(GOOD, "r.yaml", &[Override::parse(key).unwrap()])
}

pub(crate) fn message(r: Result<Recipe, RecipeError>) -> String {
    r.expect_err("the recipe should be rejected").to_string()
}

pub(crate) fn data_section(data: &str) -> Result<Recipe, RecipeError> {
    let text = GOOD.replace("data:\n  path: x\n  seq_len: 16\n", data);
    assert_ne!(text, GOOD);
    parse(&text, "r.yaml", &[])
}

pub(crate) fn with_all(keys: &[&str]) -> Result<Recipe, RecipeError> {
    let overrides: Vec<Override> = keys.iter().map(|k| Override::parse(k).unwrap()).collect();
    parse(GOOD, "r.yaml", &overrides)
}
