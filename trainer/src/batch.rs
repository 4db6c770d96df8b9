//! A batch of token ids as the tensors a forward pass reads: inputs and next-token
//! targets, and the attention mask that keeps packed documents apart. It knows nothing
//! of where the ids come from (the data pipeline) or of ranks.

use tch::{Device, Kind, Tensor};

/// Inputs and targets (rows x seq_len, i64) of `sequences` (each seq_len + 1 ids).
pub fn batch_tensors(sequences: &[Vec<u32>], device: Device) -> (Tensor, Tensor) {
    let ids: Vec<i64> = sequences.iter().flatten().map(|&t| t as i64).collect();
    let all = Tensor::from_slice(&ids)
        .view([sequences.len() as i64, -1])
        .to_device(device);
    let len = all.size()[1] - 1;
    (all.narrow(1, 0, len), all.narrow(1, 1, len))
}

/// Attention mask keeping each position within its document (and causal): batch x 1 x
/// seq x seq, true = attend. `segments` holds a segment id per input position.
pub fn document_mask(segments: &[u32], rows: usize, device: Device) -> Tensor {
    let seg: Vec<i64> = segments.iter().map(|&s| s as i64).collect();
    let seg = Tensor::from_slice(&seg)
        .view([rows as i64, -1])
        .to_device(device);
    let len = seg.size()[1];
    let same = seg.unsqueeze(2).eq_tensor(&seg.unsqueeze(1));
    let causal = Tensor::ones([len, len], (Kind::Bool, device)).tril(0);
    (same.logical_and(&causal)).unsqueeze(1)
}
