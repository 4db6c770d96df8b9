//! Checkpoints. `sharded` is the resumable format (a safetensors file and a state JSON
//! per rank, each written by that rank, a manifest with BLAKE3 hashes written last, a
//! `latest` pointer) on local disk or an object store, with retention and a background
//! writer; `reader` opens one for ranged, verified reads in any layout.
//! `save`/`load_model` write and read a run's final single-file weights
//! (`checkpoint/model.safetensors` + `meta.json`), the input of `catapult export`.

pub mod reader;
pub mod safetensors;
pub mod sharded;

pub use reader::{Loaded, Reader, TensorInfo};
pub use safetensors::{Dtype, HostTensor, SafetensorsError};
pub use sharded::{
    kill_self, kill_self_on, step_dir, AsyncSaver, Checkpoints, FileEntry, Manifest, ManifestHead,
    Piece, RankLayout, RankState, SaveRequest, ShardError, World, FAULT_ENV,
};

use std::path::{Path, PathBuf};
use tch::Tensor;

/// Errors while writing or reading a checkpoint directory; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Filesystem failure.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// libtorch could not serialize the tensors.
    #[error("{path}: cannot write safetensors: {reason}")]
    Tensors {
        /// The file.
        path: PathBuf,
        /// What libtorch said.
        reason: String,
    },
    /// A model file that cannot be read back.
    #[error(
        "{path}: cannot read safetensors ({reason}); the file is damaged or was not written \
         by catapult: point at a run's checkpoint/ directory, or export it again"
    )]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// What libtorch said.
        reason: String,
    },
}

/// File name of the model tensors inside a checkpoint directory.
pub const MODEL_FILE: &str = "model.safetensors";
/// File name of the metadata inside a checkpoint directory.
pub const META_FILE: &str = "meta.json";

/// Writes `tensors` (sorted by name here, so the file's bytes depend only on the values)
/// and `meta` into `dir` as `model.safetensors` and `meta.json`.
pub fn save(
    dir: &Path,
    tensors: &[(String, Tensor)],
    meta: &serde_json::Value,
) -> Result<PathBuf, CheckpointError> {
    std::fs::create_dir_all(dir).map_err(|source| CheckpointError::Io {
        path: dir.into(),
        source,
    })?;
    let model = dir.join(MODEL_FILE);
    write_tensors(&model, tensors)?;
    let text = serde_json::to_string_pretty(meta).expect("JSON values serialize");
    write_atomically(&dir.join(META_FILE), text.as_bytes())?;
    Ok(model)
}

/// Writes a safetensors file with `tensors` sorted by name, under a temporary name that is
/// renamed into place, so a crash never leaves a truncated file under the final name.
pub fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), CheckpointError> {
    let mut sorted: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.as_str(), t.to_device(tch::Device::Cpu).contiguous()))
        .collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let tmp = temporary(path);
    Tensor::write_safetensors(&sorted, &tmp).map_err(|e| CheckpointError::Tensors {
        path: path.into(),
        reason: e.to_string(),
    })?;
    std::fs::rename(&tmp, path).map_err(|source| CheckpointError::Io {
        path: path.into(),
        source,
    })
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let tmp = temporary(path);
    std::fs::write(&tmp, bytes).map_err(|source| CheckpointError::Io {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| CheckpointError::Io {
        path: path.into(),
        source,
    })
}

fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Reads every tensor of a checkpoint directory's model file, by name.
pub fn load_model(dir: &Path) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    let path = dir.join(MODEL_FILE);
    if let Err(source) = std::fs::metadata(&path) {
        return Err(CheckpointError::Io { path, source });
    }
    Tensor::read_safetensors(&path).map_err(|e| CheckpointError::Unreadable {
        path,
        reason: e.to_string().lines().next().unwrap_or_default().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_tensors_read_back_bitwise() {
        let dir = std::env::temp_dir().join(format!("catapult-ckpt-{}", std::process::id()));
        let a = Tensor::randn([3, 4], (tch::Kind::Float, tch::Device::Cpu));
        let b = Tensor::arange(5, (tch::Kind::Int64, tch::Device::Cpu));
        let tensors = vec![
            ("z.b".to_string(), b.shallow_clone()),
            ("a.a".to_string(), a.shallow_clone()),
        ];
        save(&dir, &tensors, &serde_json::json!({"step": 3})).unwrap();
        let back = load_model(&dir).unwrap();
        let names: Vec<&str> = back.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"a.a") && names.contains(&"z.b"));
        for (n, t) in back {
            let orig = if n == "a.a" { &a } else { &b };
            assert!(t.equal(orig), "{n} changed");
        }
        assert!(!dir.join("model.safetensors.tmp").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
