//! Recipes: the YAML file that fully describes a training run, parsed into typed structs.
//!
//! This module owns reading a recipe (`load`, `parse`), applying `--set` overrides and
//! the semantic checks that must pass before any rank starts; the `Recipe` helpers that
//! derive paths and the data pipeline's configuration from it live here too. Every error
//! names the file (or the `--set` argument), the field's dotted path, the problem and the
//! fix.
//!
//! It knows nothing about tensors, processes or any other trainer module: the rest of
//! the trainer depends on `recipe`, never the reverse (the config vocabulary they share,
//! such as parameter `Group`s, is defined in `schema`). Files: `schema` (the structs,
//! enums and defaults), `overrides` (`--set`), `validate` (the checks), `error`
//! (`RecipeError` and the wording of serde's errors).

mod error;
#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod golden;
mod overrides;
mod schema;
mod validate;

pub use error::{RecipeError, UnknownOptimizerInit};
pub use overrides::Override;
pub use schema::{
    Backend, BiasControlConfig, BiasMode, CheckpointConfig, DataConfig, DatasetConfig, DeviceKind,
    Group, GroupOverride, GrowthConfig, KiSchedule, LaunchConfig, ModelConfig, MoeConfig,
    NonFiniteAction, OptimizerInit, OutputConfig, ParallelConfig, PhaseConfig, Precision,
    ProxyConfig, Recipe, Recompute, Reduction, Schedule, SdcAction, ShardMode, StorageConfig,
    SystemConfig, TrainConfig, TransferConfig, BYTE_VOCAB,
};
pub use validate::validate;

use error::{classify, syntax};
use serde_yaml_ng::Value;
use std::path::{Path, PathBuf};

/// Loads a recipe file, applies overrides and runs every semantic check.
pub fn load(file: &Path, overrides: &[Override]) -> Result<Recipe, RecipeError> {
    let text = std::fs::read_to_string(file).map_err(|e| RecipeError::Read {
        file: file.into(),
        reason: e.to_string(),
    })?;
    parse(&text, &file.display().to_string(), overrides)
}

/// Parses recipe text (`origin` names it in errors), applies overrides, validates.
pub fn parse(text: &str, origin: &str, overrides: &[Override]) -> Result<Recipe, RecipeError> {
    // First pass on the text itself, so that errors carry the file's line numbers.
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let first: Result<Recipe, _> = serde_path_to_error::deserialize(de);
    let mut recipe = match first {
        Ok(r) if overrides.is_empty() => r,
        Ok(_) => {
            let mut tree: Value = serde_yaml_ng::from_str(text).map_err(|e| syntax(origin, e))?;
            for o in overrides {
                o.apply(&mut tree)?;
            }
            let result: Result<Recipe, _> = serde_path_to_error::deserialize(tree);
            result.map_err(|e| {
                let path = e.path().to_string();
                // The file alone parsed, so the error lies in an override: the last one
                // whose key is on the error's path (an unknown key's error may stop at
                // its parent section).
                let culprit = overrides
                    .iter()
                    .rev()
                    .find(|o| {
                        let key = o.path.join(".");
                        path.starts_with(&key) || key.starts_with(&path)
                    })
                    .map(|o| format!("--set {}", o.arg))
                    .unwrap_or_else(|| origin.to_string());
                classify(&culprit, &path, None, e.into_inner())
            })?
        }
        Err(e) => {
            let path = e.path().to_string();
            let mut line = e.inner().location().map(|l| l.line());
            // serde reports a duplicate key at its mapping's first line: point at the
            // repeated key itself.
            if let Some(key) = e.inner().to_string().split("duplicate field `").nth(1) {
                let key = key.split('`').next().unwrap_or_default();
                line = repeated_key_line(text, &path, key).or(line);
            }
            if e.inner().to_string().contains("did not find expected")
                || e.inner().to_string().contains("while parsing")
                || e.inner().to_string().contains("while scanning")
            {
                return Err(RecipeError::Syntax {
                    file: origin.into(),
                    line,
                    reason: e.into_inner().to_string(),
                });
            }
            return Err(classify(origin, &path, line, e.into_inner()));
        }
    };
    // Resolved defaults that depend on other fields.
    if recipe.data.streams == 0 {
        recipe.data.streams = gcd(recipe.train.global_batch_size, 16);
    }
    validate(&recipe, origin).map_err(|e| blame_overrides(e, overrides))?;
    Ok(recipe)
}

/// A check that failed on a field an override set names the override beside the file.
fn blame_overrides(e: RecipeError, overrides: &[Override]) -> RecipeError {
    match e {
        RecipeError::Inconsistent {
            file,
            fields,
            problem,
            fix,
        } => {
            let set: Vec<String> = overrides
                .iter()
                .filter(|o| {
                    let key = o.path.join(".");
                    fields
                        .iter()
                        .any(|f| f == &key || f.starts_with(&format!("{key}.")))
                })
                .map(|o| format!("--set {}", o.arg))
                .collect();
            let file = match set.is_empty() {
                true => file,
                false => format!("{file} with {}", set.join(", ")),
            };
            RecipeError::Inconsistent {
                file,
                fields,
                problem,
                fix,
            }
        }
        other => other,
    }
}

/// The line (1-based) of the second `key:` directly under the block mapping at dotted
/// `path` (`.` is the top level), or None when the text does not show one.
fn repeated_key_line(text: &str, path: &str, key: &str) -> Option<usize> {
    let want: Vec<&str> = path
        .split('.')
        .filter(|p| !p.is_empty())
        .chain([key])
        .collect();
    // The keys of the mappings enclosing the current line, with their indentation.
    let mut stack: Vec<(usize, &str)> = Vec::new();
    let mut seen = 0;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split(" #").next().unwrap_or(raw);
        let body = line.trim_start();
        if body.is_empty() || body.starts_with('#') || body.starts_with('-') {
            continue;
        }
        let Some((k, _)) = body.split_once(':') else {
            continue;
        };
        let indent = line.len() - body.len();
        while stack.last().is_some_and(|&(at, _)| at >= indent) {
            stack.pop();
        }
        stack.push((indent, k.trim().trim_matches(['"', '\'']).trim()));
        if stack.iter().map(|&(_, k)| k).eq(want.iter().copied()) {
            seen += 1;
            if seen == 2 {
                return Some(i + 1);
            }
        }
    }
    None
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Recipe {
    /// The data pipeline's configuration.
    pub fn pipeline_config(&self) -> catapult_data::PipelineConfig {
        let d = &self.data;
        catapult_data::PipelineConfig {
            datasets: d
                .dataset_list()
                .into_iter()
                .map(|ds| catapult_data::DatasetSpec {
                    name: ds.name,
                    location: ds.path,
                    text_column: ds.text_column.unwrap_or_else(|| d.text_column.clone()),
                    tokens_column: ds.tokens_column.or_else(|| d.tokens_column.clone()),
                    verify: d.verify_shards,
                })
                .collect(),
            phases: d.resolved_phases(),
            global_batch: self.train.global_batch_size,
            streams: d.streams,
            shuffle_buffer: d.shuffle_buffer,
            mixture_window: d.mixture_window,
            workers: d.workers,
            read_ahead_bytes: d.read_ahead_mb << 20,
            valid_fraction: d.valid_fraction,
            seed: self.seed,
            tokenizer: d.tokenizer.clone(),
            eod_token: d.eod_token.clone(),
            storage: d.storage.options(),
        }
    }

    /// The checkpoint root: `checkpoint.dir`, or `<run dir>/checkpoints`.
    pub fn checkpoint_root(&self) -> String {
        self.checkpoint
            .dir
            .clone()
            .unwrap_or_else(|| self.run_dir().join("checkpoints").display().to_string())
    }

    /// The run directory: `output.dir`, or `runs/<name>`.
    pub fn run_dir(&self) -> PathBuf {
        self.output
            .dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(&self.name))
    }

    /// The recipe as YAML with every default filled in.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).expect("a recipe always serializes")
    }
}

/// Small configurations for unit tests across the crate.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::ModelConfig;

    /// A small model with `n` FFN experts, `z` zero experts, top-`k`, K_e = `ke`.
    pub fn model_config(n: usize, z: usize, k: usize, ke: usize, layers: usize) -> ModelConfig {
        ModelConfig {
            vocab_size: 300,
            hidden_size: 32,
            num_layers: layers,
            num_attention_heads: 2,
            q_lora_rank: 8,
            kv_lora_rank: 2,
            qk_nope_head_dim: 8,
            qk_rope_head_dim: 4,
            v_head_dim: 6,
            ffn_hidden_size: 48,
            expert_ffn_hidden_size: 12,
            n_routed_experts: n,
            zero_expert_num: z,
            moe_topk: k,
            target_ffn_experts: Some(ke),
            routed_scaling_factor: 1.5,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            initializer_range: 0.2,
            mtp_layers: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::fixtures::*;

    #[test]
    fn streams_default_to_a_divisor_of_the_batch_and_are_checked() {
        assert_eq!(with("train.global_batch_size=4").unwrap().data.streams, 4);
        assert_eq!(with("train.global_batch_size=48").unwrap().data.streams, 16);
        assert_eq!(with("train.global_batch_size=6").unwrap().data.streams, 2);
        let m = message(with("data.streams=3"));
        assert!(
            m.contains("`data.streams`") && m.contains("`train.global_batch_size`"),
            "{m}"
        );
        assert!(m.contains("(1, 2, 4)"), "{m}");
    }

    #[test]
    fn a_repeated_key_is_reported_at_its_own_line() {
        let nested = GOOD.replace("  lr: 0.001\n", "  lr: 0.001\n  steps: 11\n");
        let m = message(parse(&nested, "r.yaml", &[]));
        let line = nested.lines().position(|l| l == "  steps: 11").unwrap() + 1;
        assert!(
            m.contains(&format!("(line {line})")) && m.contains("`steps`"),
            "{m}"
        );
        let top = format!("name: a\n{GOOD}");
        let m = message(parse(&top, "r.yaml", &[]));
        assert!(m.contains("(line 2)") && m.contains("`name`"), "{m}");
    }

    #[test]
    fn a_check_that_fails_on_an_overridden_field_names_the_override() {
        let m = message(with("model.num_layers=0"));
        assert!(
            m.starts_with("r.yaml with --set model.num_layers=0: "),
            "{m}"
        );
        let m = message(parse(
            &GOOD.replace("num_layers: 1", "num_layers: 0"),
            "r.yaml",
            &[],
        ));
        assert!(m.starts_with("r.yaml: "), "{m}");
    }

    #[test]
    fn good_recipe_parses_with_defaults() {
        let r = parse(GOOD, "r.yaml", &[]).unwrap();
        assert_eq!(r.train.adam_eps, 1e-16);
        assert_eq!(r.model.target_ffn_experts(), 1);
        assert_eq!(r.run_dir(), PathBuf::from("runs/t"));
    }

    #[test]
    fn resolved_recipe_round_trips() {
        let r = parse(GOOD, "r.yaml", &[]).unwrap();
        let again = parse(&r.to_yaml(), "shown.yaml", &[]).unwrap();
        assert_eq!(r, again);
    }
}
