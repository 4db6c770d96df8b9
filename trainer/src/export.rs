//! Export to the Hugging Face format: `config.json` with `LongcatFlashConfig` fields and
//! `model.safetensors` with the tensor names and shapes that transformers'
//! `LongcatFlashForCausalLM` loads with no missing, unexpected or mismatched key.
//!
//! Our names already follow transformers, except the routed experts: we store
//! `mlp.experts.{gate,up,down}_proj` stacked per expert; transformers 5 holds
//! `mlp.experts.gate_up_proj` as (N + Z) x 2I x H (rows for the zero experts included,
//! unused) and `mlp.experts.down_proj` as N x H x I. The per-expert names of the released
//! checkpoint (`mlp.experts.{j}.gate_proj.weight`) are merged by transformers into N rows
//! and then refused for that shape whenever Z > 0, so the fused layout is what loads.

use crate::recipe::{ModelConfig, Recipe};
use catapult_data::ByteTokenizer;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Errors of `export_hf`, naming the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The checkpoint could not be read.
    #[error(transparent)]
    Checkpoint(#[from] catapult_checkpoints::CheckpointError),
    /// The checkpoint's metadata is missing or malformed.
    #[error("{path}: {problem}; point `catapult export` at a checkpoint directory written by `catapult train`")]
    Meta {
        /// meta.json.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Writing the output failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A tensor the model must have is absent.
    #[error("{path}: tensor `{name}` is missing; the checkpoint is incomplete")]
    Missing {
        /// The checkpoint's model file.
        path: PathBuf,
        /// The tensor name.
        name: String,
    },
}

impl ExportError {
    /// Whether the user named the wrong thing (no checkpoint there, or not one written by
    /// `catapult train`): exit 2. A damaged or incomplete one is a failure (exit 1).
    pub fn is_bad_input(&self) -> bool {
        match self {
            ExportError::Meta { .. } => true,
            ExportError::Checkpoint(catapult_checkpoints::CheckpointError::Io {
                source, ..
            }) => source.kind() == std::io::ErrorKind::NotFound,
            _ => false,
        }
    }
}

/// `config.json` for transformers' `LongcatFlashConfig`.
pub fn hf_config(m: &ModelConfig, max_positions: usize) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LongcatFlashForCausalLM"],
        "model_type": "longcat_flash",
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "num_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_attention_heads,
        "ffn_hidden_size": m.ffn_hidden_size,
        "expert_ffn_hidden_size": m.expert_ffn_hidden_size,
        "q_lora_rank": m.q_lora_rank,
        "kv_lora_rank": m.kv_lora_rank,
        "qk_nope_head_dim": m.qk_nope_head_dim,
        "qk_rope_head_dim": m.qk_rope_head_dim,
        "head_dim": m.qk_rope_head_dim,
        "qk_head_dim": m.qk_head_dim(),
        "v_head_dim": m.v_head_dim,
        "n_routed_experts": m.n_routed_experts,
        "zero_expert_num": m.zero_expert_num,
        "moe_topk": m.moe_topk,
        "routed_scaling_factor": m.routed_scaling_factor,
        "rms_norm_eps": m.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "max_position_embeddings": max_positions,
        "initializer_range": m.initializer_range,
        "hidden_act": "silu",
        "attention_bias": false,
        "tie_word_embeddings": false,
        "bos_token_id": null,
        "eos_token_id": ByteTokenizer::EOD,
        "pad_token_id": null,
        "dtype": "float32",
    })
}

/// Our tensors under transformers' names and shapes.
pub fn hf_tensors(
    m: &ModelConfig,
    ours: &[(String, Tensor)],
    source: &Path,
) -> Result<Vec<(String, Tensor)>, ExportError> {
    let find = |name: &str| {
        ours.iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.shallow_clone())
            .ok_or_else(|| ExportError::Missing {
                path: source.into(),
                name: name.into(),
            })
    };
    let mut out = Vec::with_capacity(ours.len());
    for (name, tensor) in ours {
        if name.ends_with(".mlp.experts.gate_proj") {
            let prefix = name.trim_end_matches("gate_proj");
            let up = find(&format!("{prefix}up_proj"))?;
            let fused = Tensor::cat(&[tensor, &up], 1);
            let s = fused.size();
            let zero_rows = Tensor::zeros(
                [m.zero_expert_num as i64, s[1], s[2]],
                (fused.kind(), fused.device()),
            );
            out.push((
                format!("{prefix}gate_up_proj"),
                Tensor::cat(&[fused, zero_rows], 0),
            ));
        } else if name.ends_with(".mlp.experts.up_proj") {
            continue;
        } else {
            out.push((name.clone(), tensor.shallow_clone()));
        }
    }
    if m.mtp_layers > 0 {
        // The released checkpoint carries the MTP layer's embedding under its own name;
        // ours shares the main embedding.
        out.push((
            "model.mtp.embed_tokens.weight".into(),
            find("model.embed_tokens.weight")?,
        ));
    }
    Ok(out)
}

/// Reads the checkpoint in `checkpoint` (a directory written by `catapult train`) and
/// writes `config.json` and `model.safetensors` into `out`.
pub fn export_hf(checkpoint: &Path, out: &Path) -> Result<(), ExportError> {
    let meta_path = checkpoint.join(catapult_checkpoints::META_FILE);
    let meta_err = |problem: String| ExportError::Meta {
        path: meta_path.clone(),
        problem,
    };
    let text = std::fs::read_to_string(&meta_path).map_err(|e| meta_err(e.to_string()))?;
    let meta: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| meta_err(e.to_string()))?;
    let recipe: Recipe = serde_json::from_value(meta["recipe"].clone())
        .map_err(|e| meta_err(format!("no valid `recipe` ({e})")))?;
    let tensors = catapult_checkpoints::load_model(checkpoint)?;
    let hf = hf_tensors(
        &recipe.model,
        &tensors,
        &checkpoint.join(catapult_checkpoints::MODEL_FILE),
    )?;
    let config = hf_config(&recipe.model, recipe.data.seq_len);
    std::fs::create_dir_all(out).map_err(|source| ExportError::Io {
        path: out.into(),
        source,
    })?;
    catapult_checkpoints::write_tensors(&out.join("model.safetensors"), &hf)?;
    let body = serde_json::to_string_pretty(&config).expect("JSON values serialize");
    catapult_checkpoints::write_atomically(&out.join("config.json"), body.as_bytes())?;
    Ok(())
}
