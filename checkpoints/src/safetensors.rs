//! The safetensors file format, written and read here so the bytes are a function of the
//! tensors alone (names sorted, no hash-ordered metadata): an 8-byte little-endian header
//! length, a JSON header `{name: {dtype, shape, data_offsets}}` padded with spaces to a
//! multiple of 8 bytes, then the tensors' bytes back to back. Python's `safetensors`
//! reads these files.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Why bytes are not a usable safetensors file.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    /// Fewer bytes than the header length field.
    #[error("{len} bytes, shorter than the 8-byte header length: the file is truncated")]
    Short {
        /// Bytes in the file.
        len: usize,
    },
    /// The header length points past the end of the file.
    #[error(
        "header length {header} runs past the end of the file ({len} bytes): the file is \
         truncated or not safetensors"
    )]
    HeaderPastEnd {
        /// The header length the file gives.
        header: u64,
        /// Bytes in the file.
        len: usize,
    },
    /// The header is not a JSON object of tensor entries.
    #[error("bad header ({reason})")]
    Header {
        /// What the JSON parser said.
        reason: String,
    },
    /// One tensor's entry is malformed or does not fit the data.
    #[error("tensor {name}: {problem}")]
    Tensor {
        /// The tensor's name.
        name: String,
        /// What is wrong.
        problem: String,
    },
}

/// Element types used by checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dtype {
    /// 32-bit float.
    F32,
    /// bfloat16.
    BF16,
    /// 16-bit float.
    F16,
    /// 64-bit signed integer.
    I64,
    /// 32-bit signed integer.
    I32,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            Dtype::I64 => 8,
        }
    }
}

/// One tensor on the host: name, type, shape and little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Name in the file.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Raw bytes (`numel * dtype.size()`), shared without copying.
    pub data: Bytes,
}

impl HostTensor {
    /// Elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Serialize, Deserialize)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

/// The header (length field, JSON, space padding to a multiple of 8) of a file holding
/// `tensors` (name, type, shape) in this order, back to back; the order must be by name,
/// as `serialize_chunks` writes them.
pub fn header_for(tensors: &[(&str, Dtype, &[usize])]) -> Vec<u8> {
    let mut header = BTreeMap::new();
    let mut offset = 0;
    for &(name, dtype, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * dtype.size();
        header.insert(
            name.to_string(),
            Entry {
                dtype,
                shape: shape.to_vec(),
                data_offsets: [offset, offset + bytes],
            },
        );
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&header).expect("the header serializes");
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut head = Vec::with_capacity(8 + json.len());
    head.extend_from_slice(&(json.len() as u64).to_le_bytes());
    head.extend_from_slice(&json);
    head
}

/// The file's bytes for `tensors` (sorted by name; names must be unique), as chunks: the
/// header, then each tensor's bytes (shared, not copied).
pub fn serialize_chunks(tensors: &[HostTensor]) -> Vec<Bytes> {
    let mut order: Vec<&HostTensor> = tensors.iter().collect();
    order.sort_by(|a, b| a.name.cmp(&b.name));
    let entries: Vec<(&str, Dtype, &[usize])> = order
        .iter()
        .map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice()))
        .collect();
    let mut out = vec![Bytes::from(header_for(&entries))];
    out.extend(order.into_iter().map(|t| t.data.clone()));
    out
}

/// The file's bytes for `tensors`, in one buffer.
pub fn serialize(tensors: &[HostTensor]) -> Vec<u8> {
    serialize_chunks(tensors).concat()
}

/// One tensor's entry in a file's header: where its bytes sit in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderEntry {
    /// The tensor's name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Its bytes, as offsets from the start of the file.
    pub bytes: std::ops::Range<u64>,
}

/// The header length a file's first 8 bytes give, checked against the file's size.
pub fn header_len(first: &[u8], file_len: u64) -> Result<u64, SafetensorsError> {
    let Some(len_field) = first.first_chunk::<8>() else {
        return Err(SafetensorsError::Short { len: first.len() });
    };
    let header = u64::from_le_bytes(*len_field);
    match header.checked_add(8) {
        Some(end) if end <= file_len => Ok(header),
        _ => Err(SafetensorsError::HeaderPastEnd {
            header,
            len: file_len as usize,
        }),
    }
}

/// The entries of a header (`header`: the JSON after the length field) of a file of
/// `file_len` bytes, by name; an error says what is malformed.
pub fn parse_header(header: &[u8], file_len: u64) -> Result<Vec<HeaderEntry>, SafetensorsError> {
    let entries: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| SafetensorsError::Header {
            reason: e.to_string(),
        })?;
    let data_start = 8 + header.len() as u64;
    let data_len = file_len.saturating_sub(data_start) as usize;
    let mut out = Vec::new();
    for (name, value) in entries {
        if name == "__metadata__" {
            continue;
        }
        let bad = |problem: String| SafetensorsError::Tensor {
            name: name.clone(),
            problem,
        };
        let e: Entry = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        let [begin, end] = e.data_offsets;
        let expected = e
            .shape
            .iter()
            .try_fold(e.dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("shape {:?} overflows", e.shape)))?;
        if end < begin || end > data_len || end - begin != expected {
            return Err(bad(format!(
                "offsets {begin}..{end} do not fit: its shape needs {expected} bytes, and the \
                 data section has {data_len}"
            )));
        }
        out.push(HeaderEntry {
            name,
            dtype: e.dtype,
            shape: e.shape,
            bytes: data_start + begin as u64..data_start + end as u64,
        });
    }
    Ok(out)
}

/// The tensors of a safetensors file, by name; an error says what is malformed.
pub fn deserialize(bytes: &Bytes) -> Result<Vec<HostTensor>, SafetensorsError> {
    let n = header_len(bytes, bytes.len() as u64)? as usize;
    let entries = parse_header(&bytes[8..8 + n], bytes.len() as u64)?;
    Ok(entries
        .into_iter()
        .map(|e| HostTensor {
            data: bytes.slice(e.bytes.start as usize..e.bytes.end as usize),
            name: e.name,
            dtype: e.dtype,
            shape: e.shape,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_orders_by_name() {
        let a = HostTensor {
            name: "b".into(),
            dtype: Dtype::F32,
            shape: vec![2],
            data: vec![1, 2, 3, 4, 5, 6, 7, 8].into(),
        };
        let b = HostTensor {
            name: "a".into(),
            dtype: Dtype::I64,
            shape: vec![1],
            data: vec![9; 8].into(),
        };
        let bytes = serialize(&[a.clone(), b.clone()]);
        assert_eq!(serialize(&[b.clone(), a.clone()]), bytes);
        assert_eq!(
            (8 + u64::from_le_bytes(bytes[..8].try_into().unwrap())) % 8,
            0
        );
        let bytes = Bytes::from(bytes);
        assert_eq!(deserialize(&bytes).unwrap(), vec![b, a]);
        assert!(deserialize(&bytes.slice(..bytes.len() - 1)).is_err());
        // Hostile lengths are errors, not panics.
        let mut huge = bytes.to_vec();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(deserialize(&Bytes::from(huge)).is_err());
        let header =
            br#"{"x":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,0]}}"#;
        let mut overflow = (header.len() as u64).to_le_bytes().to_vec();
        overflow.extend_from_slice(header);
        let err = deserialize(&Bytes::from(overflow)).unwrap_err().to_string();
        assert!(err.contains("overflows"), "{err}");
        assert!(matches!(
            deserialize(&Bytes::from_static(b"1234")),
            Err(SafetensorsError::Short { len: 4 })
        ));
    }
}
