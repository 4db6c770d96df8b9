//! Export to the Hugging Face format: `config.json` with `LongcatFlashConfig` fields and
//! the weights with the tensor names and shapes that transformers'
//! `LongcatFlashForCausalLM` loads with no missing, unexpected or mismatched key: one
//! `model.safetensors`, or, above `max_shard_bytes`, `model-0000N-of-0000M.safetensors`
//! files with `model.safetensors.index.json`, as transformers writes large models.
//!
//! The source is a run's `checkpoint/` directory or a sharded step checkpoint (local or
//! on an object store, written by any layout). Nothing is held whole: the output
//! tensors are planned from the source's names and shapes alone, then streamed in
//! chunks of at most 4 MiB (ranged reads of the ranks' files), so the peak memory is
//! a chunk, however large the model.
//!
//! Our names already follow transformers, except the routed experts: we store
//! `mlp.experts.{gate,up,down}_proj` stacked per expert; transformers 5 holds
//! `mlp.experts.gate_up_proj` as (N + Z) x 2I x H (rows for the zero experts included,
//! unused) and `mlp.experts.down_proj` as N x H x I. The per-expert names of the released
//! checkpoint (`mlp.experts.{j}.gate_proj.weight`) are merged by transformers into N rows
//! and then refused for that shape whenever Z > 0, so the fused layout is what loads.

use crate::recipe::{ModelConfig, Recipe};
use catapult_checkpoints::{Checkpoints, Dtype, HostTensor, Loaded};
use catapult_data::{ByteTokenizer, StorageOptions};
use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Errors of `export_hf`, naming the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The checkpoint could not be read.
    #[error(transparent)]
    Checkpoint(#[from] catapult_checkpoints::CheckpointError),
    /// The sharded checkpoint could not be read.
    #[error(transparent)]
    Sharded(#[from] catapult_checkpoints::ShardError),
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
    /// A tensor the model must have is absent, or has another shape.
    #[error(
        "{path}: tensor `{name}` {problem}; the checkpoint is incomplete or not of this model"
    )]
    Missing {
        /// The checkpoint.
        path: String,
        /// The tensor name.
        name: String,
        /// Missing, or which shape.
        problem: String,
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

/// Where an export reads tensors: names, types and shapes up front, then element ranges.
trait Source {
    /// Every tensor: (type, shape), by name.
    fn tensors(&self) -> &BTreeMap<String, (Dtype, Vec<usize>)>;
    /// Elements `range` of `name` (row-major), flat.
    fn read(&self, name: &str, range: Range<usize>) -> Result<HostTensor, ExportError>;
    /// The recipe the checkpoint was trained with.
    fn recipe(&self) -> &Recipe;
    /// What to call it in messages.
    fn display(&self) -> String;
}

/// A run's final `checkpoint/` directory: one safetensors file read with positioned
/// reads (its header parsed once).
struct FinalWeights {
    path: PathBuf,
    recipe: Recipe,
    tensors: BTreeMap<String, (Dtype, Vec<usize>)>,
    offsets: BTreeMap<String, u64>,
}

impl FinalWeights {
    fn open(dir: &Path) -> Result<Self, ExportError> {
        let meta_path = dir.join(catapult_checkpoints::META_FILE);
        let meta_err = |problem: String| ExportError::Meta {
            path: meta_path.clone(),
            problem,
        };
        let text = std::fs::read_to_string(&meta_path).map_err(|e| meta_err(e.to_string()))?;
        let meta: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| meta_err(e.to_string()))?;
        let recipe: Recipe = serde_json::from_value(meta["recipe"].clone())
            .map_err(|e| meta_err(format!("no valid `recipe` ({e})")))?;
        let path = dir.join(catapult_checkpoints::MODEL_FILE);
        let io = |source: std::io::Error| {
            ExportError::Checkpoint(catapult_checkpoints::CheckpointError::Io {
                path: path.clone(),
                source,
            })
        };
        let unreadable = |reason: String| {
            ExportError::Checkpoint(catapult_checkpoints::CheckpointError::Unreadable {
                path: path.clone(),
                reason,
            })
        };
        let mut file = std::fs::File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut first = [0u8; 8];
        file.read_exact(&mut first)
            .map_err(|e| unreadable(e.to_string()))?;
        let n = catapult_checkpoints::safetensors::header_len(&first, len)
            .map_err(|e| unreadable(e.to_string()))?;
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header)
            .map_err(|e| unreadable(e.to_string()))?;
        let entries = catapult_checkpoints::safetensors::parse_header(&header, len)
            .map_err(|e| unreadable(e.to_string()))?;
        let mut tensors = BTreeMap::new();
        let mut offsets = BTreeMap::new();
        for e in entries {
            offsets.insert(e.name.clone(), e.bytes.start);
            tensors.insert(e.name, (e.dtype, e.shape));
        }
        Ok(Self {
            path,
            recipe,
            tensors,
            offsets,
        })
    }
}

impl Source for FinalWeights {
    fn tensors(&self) -> &BTreeMap<String, (Dtype, Vec<usize>)> {
        &self.tensors
    }

    fn read(&self, name: &str, range: Range<usize>) -> Result<HostTensor, ExportError> {
        let dtype = self.tensors[name].0;
        let size = dtype.size();
        let unreadable = |reason: String| {
            ExportError::Checkpoint(catapult_checkpoints::CheckpointError::Unreadable {
                path: self.path.clone(),
                reason,
            })
        };
        let mut file = std::fs::File::open(&self.path).map_err(|e| unreadable(e.to_string()))?;
        let at = self.offsets[name] + (range.start * size) as u64;
        file.seek(std::io::SeekFrom::Start(at))
            .map_err(|e| unreadable(e.to_string()))?;
        let mut out = vec![0u8; range.len() * size];
        file.read_exact(&mut out)
            .map_err(|e| unreadable(format!("{name}: {e}")))?;
        Ok(HostTensor {
            name: name.to_string(),
            dtype,
            shape: vec![range.len()],
            data: out.into(),
        })
    }

    fn recipe(&self) -> &Recipe {
        &self.recipe
    }

    fn display(&self) -> String {
        self.path.display().to_string()
    }
}

/// A sharded step checkpoint: ranged reads of the ranks' files.
struct Sharded {
    loaded: Loaded,
    recipe: Recipe,
    tensors: BTreeMap<String, (Dtype, Vec<usize>)>,
}

impl Sharded {
    fn open(path: &str, storage: &StorageOptions) -> Result<Self, ExportError> {
        let (store, step) = Checkpoints::open_path(path, storage)?;
        let loaded = match step {
            Some(step) => store.load(step, true)?,
            None => store
                .load_newest(true, false)?
                .ok_or_else(|| ExportError::Meta {
                    path: Path::new(path).join(catapult_checkpoints::META_FILE),
                    problem: "not a checkpoint: neither a run's checkpoint/ directory (with \
                          meta.json) nor a sharded checkpoint (a step-NNNNNNNN directory with \
                          manifest.json, or a root holding them)"
                        .into(),
                })?,
        };
        let recipe: Recipe =
            serde_json::from_value(loaded.manifest.recipe.clone()).map_err(|e| {
                ExportError::Meta {
                    path: Path::new(&loaded.location).join(catapult_checkpoints::sharded::MANIFEST),
                    problem: format!("no valid `recipe` ({e})"),
                }
            })?;
        let tensors = loaded
            .names()
            .filter(|n| !n.starts_with("optimizer."))
            .map(|n| {
                let t = loaded.info(n).expect("a listed tensor has an entry");
                (n.to_string(), (t.dtype, t.shape.clone()))
            })
            .collect();
        Ok(Self {
            loaded,
            recipe,
            tensors,
        })
    }
}

impl Source for Sharded {
    fn tensors(&self) -> &BTreeMap<String, (Dtype, Vec<usize>)> {
        &self.tensors
    }

    fn read(&self, name: &str, range: Range<usize>) -> Result<HostTensor, ExportError> {
        Ok(self.loaded.read(name, range)?)
    }

    fn recipe(&self) -> &Recipe {
        &self.recipe
    }

    fn display(&self) -> String {
        self.loaded.location.clone()
    }
}

/// Where an output tensor's bytes come from, in order.
#[derive(Debug, Clone, PartialEq)]
enum Part {
    /// Elements of a source tensor.
    Read(String, Range<usize>),
    /// Zeros (the rows of the zero-computation experts).
    Zeros(usize),
}

/// One tensor of the Hugging Face files.
#[derive(Debug, Clone)]
struct HfTensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    parts: Vec<Part>,
}

impl HfTensor {
    fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size()) as u64
    }
}

/// The Hugging Face tensors, sorted by name, planned from the source's names and
/// shapes: routed experts' gate and up projections fused per expert as transformers 5
/// holds them, with zero rows for the zero-computation experts; the MTP layer's own
/// copy of the embedding.
fn hf_plan(m: &ModelConfig, source: &dyn Source) -> Result<Vec<HfTensor>, ExportError> {
    let tensors = source.tensors();
    let find = |name: &str| {
        tensors.get(name).ok_or_else(|| ExportError::Missing {
            path: source.display(),
            name: name.into(),
            problem: "is missing".into(),
        })
    };
    let whole = |name: &str, (dtype, shape): &(Dtype, Vec<usize>)| HfTensor {
        name: name.to_string(),
        dtype: *dtype,
        shape: shape.clone(),
        parts: vec![Part::Read(name.to_string(), 0..shape.iter().product())],
    };
    let mut out = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        if let Some(prefix) = name
            .strip_suffix("gate_proj")
            .filter(|p| p.ends_with(".mlp.experts."))
        {
            let up_name = format!("{prefix}up_proj");
            let up = find(&up_name)?;
            let (dtype, shape) = t;
            if up != t || shape.len() != 3 {
                return Err(ExportError::Missing {
                    path: source.display(),
                    name: up_name,
                    problem: format!("has {up:?}, the gate projection {t:?}"),
                });
            }
            let row = shape[1] * shape[2];
            let mut parts = Vec::with_capacity(2 * shape[0] + 1);
            for j in 0..shape[0] {
                parts.push(Part::Read(name.clone(), j * row..(j + 1) * row));
                parts.push(Part::Read(up_name.clone(), j * row..(j + 1) * row));
            }
            parts.push(Part::Zeros(m.zero_expert_num * 2 * row));
            out.push(HfTensor {
                name: format!("{prefix}gate_up_proj"),
                dtype: *dtype,
                shape: vec![shape[0] + m.zero_expert_num, 2 * shape[1], shape[2]],
                parts,
            });
        } else if !name.ends_with(".mlp.experts.up_proj") {
            out.push(whole(name, t));
        }
    }
    if m.mtp_layers > 0 {
        // The released checkpoint carries the MTP layer's embedding under its own name;
        // ours shares the main embedding.
        let embed = "model.embed_tokens.weight";
        let mut copy = whole(embed, find(embed)?);
        copy.name = "model.mtp.embed_tokens.weight".into();
        out.push(copy);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Largest read or write at once, in bytes.
const CHUNK_BYTES: usize = 4 << 20;

/// What an export wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Exported {
    /// The weight files, in order.
    pub files: Vec<String>,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
    /// The largest tensor's bytes.
    pub largest_tensor_bytes: u64,
    /// Resident memory when the export began, and the process's peak (Linux; 0
    /// elsewhere).
    pub start_rss_bytes: u64,
    /// See `start_rss_bytes`.
    pub peak_rss_bytes: u64,
}

/// Exports the checkpoint at `source` (a run's `checkpoint/` directory, a sharded step
/// checkpoint, or a checkpoint root for its newest; local or an object-store URL) into
/// `out`: `config.json` and the weights, in files of at most `max_shard_bytes` (one
/// `model.safetensors` when they fit in one).
pub fn export_hf(
    source: &str,
    out: &Path,
    max_shard_bytes: u64,
    storage: &StorageOptions,
) -> Result<Exported, ExportError> {
    let start_rss_bytes = crate::device::memory_bytes().map_or(0, |m| m.0);
    let local = Path::new(source);
    let src: Box<dyn Source> = if !source.contains("://")
        && (local.join(catapult_checkpoints::META_FILE).exists()
            || !local.join(catapult_checkpoints::sharded::MANIFEST).exists()
                && !local.join(catapult_checkpoints::sharded::LATEST).exists()
                && !local
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("step-")))
    {
        Box::new(FinalWeights::open(local)?)
    } else {
        Box::new(Sharded::open(source, storage)?)
    };
    let recipe = src.recipe().clone();
    let plan = hf_plan(&recipe.model, src.as_ref())?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ExportError::Io { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    clear_weights(out)?;
    let shards = split(&plan, max_shard_bytes);
    let count = shards.len();
    let name = |i: usize| match count {
        1 => "model.safetensors".to_string(),
        _ => format!("model-{:05}-of-{count:05}.safetensors", i + 1),
    };
    let mut weight_map = BTreeMap::new();
    let mut files = Vec::with_capacity(count);
    for (i, shard) in shards.iter().enumerate() {
        let file = name(i);
        write_shard(&out.join(&file), shard, src.as_ref())?;
        for t in *shard {
            weight_map.insert(t.name.clone(), file.clone());
        }
        files.push(file);
    }
    let bytes: u64 = plan.iter().map(HfTensor::bytes).sum();
    if count > 1 {
        let index = serde_json::json!({
            "metadata": {"total_size": bytes},
            "weight_map": weight_map,
        });
        let body = serde_json::to_string_pretty(&index).expect("JSON values serialize");
        let path = out.join("model.safetensors.index.json");
        catapult_checkpoints::write_atomically(&path, body.as_bytes())?;
    }
    let config = hf_config(&recipe.model, recipe.data.seq_len);
    let body = serde_json::to_string_pretty(&config).expect("JSON values serialize");
    catapult_checkpoints::write_atomically(&out.join("config.json"), body.as_bytes())?;
    Ok(Exported {
        files,
        tensors: plan.len(),
        bytes,
        largest_tensor_bytes: plan.iter().map(HfTensor::bytes).max().unwrap_or(0),
        start_rss_bytes,
        peak_rss_bytes: crate::device::memory_bytes().map_or(0, |m| m.1),
    })
}

/// Removes the weight files of an earlier export in `out` (transformers would prefer a
/// stale `model.safetensors` to a new index).
fn clear_weights(out: &Path) -> Result<(), ExportError> {
    let entries = std::fs::read_dir(out).map_err(|source| ExportError::Io {
        path: out.into(),
        source,
    })?;
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        let weights = n == "model.safetensors"
            || n == "model.safetensors.index.json"
            || (n.starts_with("model-") && n.ends_with(".safetensors") && n.contains("-of-"));
        if weights {
            std::fs::remove_file(e.path()).map_err(|source| ExportError::Io {
                path: e.path(),
                source,
            })?;
        }
    }
    Ok(())
}

/// Consecutive runs of `plan` of at most `max` bytes each (a larger tensor alone).
fn split(plan: &[HfTensor], max: u64) -> Vec<&[HfTensor]> {
    let mut shards = Vec::new();
    let (mut start, mut size) = (0, 0u64);
    for (i, t) in plan.iter().enumerate() {
        if i > start && size + t.bytes() > max {
            shards.push(&plan[start..i]);
            (start, size) = (i, 0);
        }
        size += t.bytes();
    }
    shards.push(&plan[start..]);
    shards
}

/// Writes one weight file: the header, then each tensor's parts in chunks of at most
/// `CHUNK_BYTES`, under a temporary name renamed into place.
fn write_shard(path: &Path, tensors: &[HfTensor], src: &dyn Source) -> Result<(), ExportError> {
    let io = |source| ExportError::Io {
        path: path.into(),
        source,
    };
    let entries: Vec<(&str, Dtype, &[usize])> = tensors
        .iter()
        .map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice()))
        .collect();
    let tmp = path.with_extension("safetensors.tmp");
    let file = std::fs::File::create(&tmp).map_err(io)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    w.write_all(&catapult_checkpoints::safetensors::header_for(&entries))
        .map_err(io)?;
    for t in tensors {
        let per = (CHUNK_BYTES / t.dtype.size()).max(1);
        for part in &t.parts {
            match part {
                Part::Read(name, range) => {
                    let mut at = range.start;
                    while at < range.end {
                        let end = (at + per).min(range.end);
                        w.write_all(&src.read(name, at..end)?.data).map_err(io)?;
                        at = end;
                    }
                }
                Part::Zeros(n) => {
                    let zeros = vec![0u8; (*n).min(per) * t.dtype.size()];
                    let mut left = *n;
                    while left > 0 {
                        let k = left.min(per);
                        w.write_all(&zeros[..k * t.dtype.size()]).map_err(io)?;
                        left -= k;
                    }
                }
            }
        }
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}
