//! TensorBoard event files, written directly: TFRecord framing (length, masked CRC-32C,
//! payload, masked CRC-32C) around `Event` protocol buffers holding scalar summaries
//! (`simple_value`), the format `tensorboard`'s event reader parses. No TensorFlow or
//! protobuf library is needed for a handful of fields.

use std::io::Write;
use std::path::{Path, PathBuf};

/// CRC-32C (Castagnoli), reflected, as TFRecord uses.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    varint(out, ((field << 3) | 2) as u64);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// An `Event` with `wall_time` and `step` and either a file version or scalar values.
fn event(
    wall_time: f64,
    step: i64,
    file_version: Option<&str>,
    scalars: &[(String, f32)],
) -> Vec<u8> {
    let mut e = Vec::new();
    e.push(0x09); // wall_time: field 1, 64-bit
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(0x10); // step: field 2, varint
    varint(&mut e, step as u64);
    if let Some(v) = file_version {
        bytes_field(&mut e, 3, v.as_bytes());
    }
    if !scalars.is_empty() {
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut v = Vec::new();
            bytes_field(&mut v, 1, tag.as_bytes());
            v.push(0x15); // simple_value: field 2, 32-bit
            v.extend_from_slice(&value.to_le_bytes());
            bytes_field(&mut summary, 1, &v);
        }
        bytes_field(&mut e, 5, &summary);
    }
    e
}

/// One event file under a log directory, appended record by record.
#[derive(Debug)]
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl EventWriter {
    /// A new `events.out.tfevents.<time>.<host>.<pid>` file in `dir` (created).
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}",
            now() as u64,
            std::process::id()
        ));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let mut w = Self { file, path };
        w.record(&event(now(), 0, Some("brain.Event:2"), &[]))?;
        Ok(w)
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut buf = Vec::with_capacity(data.len() + 16);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&masked_crc(&len).to_le_bytes());
        buf.extend_from_slice(data);
        buf.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file.write_all(&buf)?;
        self.file.flush()
    }

    /// Scalars `(tag, value)` at `step`, in one event.
    pub fn scalars(&mut self, step: u64, values: &[(String, f32)]) -> std::io::Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        self.record(&event(now(), step as i64, None, values))
    }
}

/// The scalars of one metrics line: every number under `section/` + its key path, one
/// level of arrays as `key/INDEX` (nested arrays, such as the per-expert loads, are left
/// to the JSON file). The section is `eval` for validation lines, `checkpoint` for
/// checkpoint lines, `router` inside the router object, else `train`.
pub fn scalars_of(line: &serde_json::Value) -> Vec<(String, f32)> {
    let mut out = Vec::new();
    let Some(obj) = line.as_object() else {
        return out;
    };
    let section = if obj.contains_key("val_loss") {
        "eval"
    } else if obj.contains_key("checkpoint") {
        "checkpoint"
    } else {
        "train"
    };
    for (key, value) in obj {
        if key == "step" {
            continue;
        }
        if key == "router" {
            flatten("router", value, &mut out, 0);
        } else {
            flatten(&format!("{section}/{key}"), value, &mut out, 0);
        }
    }
    out
}

fn flatten(tag: &str, v: &serde_json::Value, out: &mut Vec<(String, f32)>, depth: usize) {
    match v {
        serde_json::Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                out.push((tag.to_string(), x as f32));
            }
        }
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                flatten(&format!("{tag}/{k}"), x, out, depth);
            }
        }
        serde_json::Value::Array(a) if depth == 0 => {
            for (i, x) in a.iter().enumerate() {
                if x.is_number() {
                    flatten(&format!("{tag}/{i}"), x, out, depth + 1);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn metrics_lines_become_tagged_scalars() {
        let line = serde_json::json!({"step": 5, "loss": 2.5, "lr": 1e-3, "data_phase": 0,
            "router": {"ffn_experts_per_token_per_layer": [2.0, 3.0],
                       "expert_load_per_layer": [[0.5, 0.5]]}});
        let s = scalars_of(&line);
        let tags: Vec<&str> = s.iter().map(|(t, _)| t.as_str()).collect();
        assert!(tags.contains(&"train/loss"));
        assert!(tags.contains(&"router/ffn_experts_per_token_per_layer/1"));
        assert!(!tags.iter().any(|t| t.contains("expert_load_per_layer")));
        let v = scalars_of(&serde_json::json!({"step": 5, "val_loss": 1.5}));
        assert_eq!(v, vec![("eval/val_loss".to_string(), 1.5f32)]);
    }
}
