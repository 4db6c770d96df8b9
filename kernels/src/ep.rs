//! Expert-parallel token exchange for one MoE layer, on host rows: routed-expert
//! selections are sent to the rank that owns their expert (dispatch), processed there,
//! and sent back to their slot (combine). Experts are split evenly and contiguously over
//! the ranks. The order is a stable sort by (owner, expert, slot), so it never depends
//! on timing, and the combine is an exact inverse of the dispatch.

use crate::comm::Comm;

/// What a dispatch did, so that `combine` can undo it.
#[derive(Debug, Clone, PartialEq)]
pub struct Dispatch {
    /// Slots (token * k + choice) in the order their rows were sent.
    order: Vec<usize>,
    /// Rows sent to each rank.
    send_counts: Vec<usize>,
    /// Rows received from each rank.
    recv_counts: Vec<usize>,
    /// The (global) expert of each received row.
    pub recv_experts: Vec<i64>,
    /// Slots per token.
    k: usize,
}

/// The rank that owns `expert` of `n_experts` over `ranks` ranks.
pub fn owner(expert: usize, n_experts: usize, ranks: usize) -> usize {
    expert / (n_experts / ranks)
}

/// Sends each selection's token row (`hidden`: tokens x `h`) to the owner of its expert.
/// `experts` holds tokens x k expert ids; ids >= `n_experts` (zero-computation experts)
/// stay home. Returns the dispatch and the received rows (rows x `h`).
pub fn dispatch(
    comm: &Comm,
    hidden: &[f32],
    h: usize,
    experts: &[usize],
    k: usize,
    n_experts: usize,
) -> (Dispatch, Vec<f32>) {
    let p = comm.size();
    assert!(
        n_experts.is_multiple_of(p),
        "{n_experts} experts do not split over {p} ranks"
    );
    let mut order: Vec<usize> = (0..experts.len())
        .filter(|&s| experts[s] < n_experts)
        .collect();
    order.sort_by_key(|&s| (owner(experts[s], n_experts, p), experts[s], s));
    let mut send_counts = vec![0; p];
    let mut rows = Vec::with_capacity(order.len() * h);
    let mut ids = Vec::with_capacity(order.len());
    for &s in &order {
        send_counts[owner(experts[s], n_experts, p)] += 1;
        let t = s / k;
        rows.extend_from_slice(&hidden[t * h..(t + 1) * h]);
        ids.push(experts[s] as i64);
    }
    let row_counts: Vec<usize> = send_counts.iter().map(|c| c * h).collect();
    let (received, _) = comm.all_to_all_v(&rows, &row_counts);
    let (recv_experts, recv_counts) = comm.all_to_all_v(&ids, &send_counts);
    (
        Dispatch {
            order,
            send_counts,
            recv_counts,
            recv_experts,
            k,
        },
        received,
    )
}

/// Sends processed rows (in the order they were received) back and places each in its
/// slot: tokens x k x `h`, zeros for slots that were not dispatched.
pub fn combine(comm: &Comm, d: &Dispatch, processed: &[f32], h: usize, tokens: usize) -> Vec<f32> {
    let row_counts: Vec<usize> = d.recv_counts.iter().map(|c| c * h).collect();
    let (back, _) = comm.all_to_all_v(processed, &row_counts);
    debug_assert_eq!(back.len(), d.send_counts.iter().sum::<usize>() * h);
    let mut out = vec![0.0; tokens * d.k * h];
    for (i, &slot) in d.order.iter().enumerate() {
        out[slot * h..(slot + 1) * h].copy_from_slice(&back[i * h..(i + 1) * h]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_rank_dispatch_and_combine_are_inverse() {
        let comm = Comm::Single;
        let (h, k, n) = (3, 2, 4);
        let hidden: Vec<f32> = (0..5 * h).map(|i| i as f32 * 0.5).collect();
        let experts = vec![3, 1, 0, 5, 2, 2, 1, 3, 4, 0]; // 4 and 5 are zero experts
        let (d, rows) = dispatch(&comm, &hidden, h, &experts, k, n);
        assert_eq!(rows.len(), 8 * h);
        assert!(
            d.recv_experts.windows(2).all(|w| w[0] <= w[1]),
            "grouped by expert"
        );
        let out = combine(&comm, &d, &rows, h, 5);
        for (slot, &e) in experts.iter().enumerate() {
            let want: Vec<f32> = if e < n {
                hidden[slot / k * h..(slot / k + 1) * h].to_vec()
            } else {
                vec![0.0; h]
            };
            assert_eq!(&out[slot * h..(slot + 1) * h], &want[..], "slot {slot}");
        }
    }
}
