//! Sharded data parallelism (`parallel.shard`, the ZeRO ladder): which contiguous flat
//! range of its parameters each rank of a replicating group owns, and moving the owned
//! ranges between the ranks. Dense parameters are split over the whole world, expert
//! parameters over their replicas, each segment of the model (a layer, or the ends) as
//! its own group. A group's parameters, in the optimizer's fixed order, are flattened
//! and concatenated; rank r of P owns elements `r * S .. (r + 1) * S` with S the
//! smallest multiple of `CHUNK` at least `total / P` (the last ranks' ranges padded), so
//! every rank's slice has the same length and holds whole chunks of the flat order, the
//! units the gradient norm is summed over in its canonical tree. The same layout places
//! every gradient reduction (`reduce`): each rank combines the elements it owns in the
//! same order whatever the shard mode, so every mode computes the bits of `none`. With the optimizer sharded, the owner updates its slice
//! (AdamW's moments exist for it only) and the updated slices are all-gathered; with the
//! parameters sharded too, the slices are all there is between passes (`gather`).

use super::mesh::{is_expert_param, Group, Parallel, Segment};
use crate::recipe::ShardMode;
use catapult_kernels::NcclError;
use std::ops::Range;
use tch::{Kind, Tensor};

/// Elements of a chunk of a group's flat order: a slice holds whole chunks, and the
/// gradient norm sums each chunk's squares, then the chunks in the canonical tree.
pub const CHUNK: usize = 256;

/// How a group's members (tensors of `sizes` elements) are split over `ranks` ranks.
#[derive(Debug, Clone, PartialEq)]
pub struct FlatLayout {
    offsets: Vec<usize>,
    sizes: Vec<usize>,
    per_rank: usize,
    rank: usize,
    ranks: usize,
}

impl FlatLayout {
    /// The layout of members of `sizes` elements over `ranks` ranks, seen from `rank`.
    pub fn new(sizes: Vec<usize>, rank: usize, ranks: usize) -> Self {
        let mut offsets = Vec::with_capacity(sizes.len());
        let mut total = 0;
        for &n in &sizes {
            offsets.push(total);
            total += n;
        }
        Self {
            offsets,
            sizes,
            per_rank: total.div_ceil(ranks.max(1) * CHUNK) * CHUNK,
            rank,
            ranks: ranks.max(1),
        }
    }

    /// Elements every rank's slice holds (padding included).
    pub fn per_rank(&self) -> usize {
        self.per_rank
    }

    /// The part of member `i` (a range of its flattened elements) rank `rank` owns;
    /// empty when it owns none of it.
    pub fn owned_by(&self, rank: usize, i: usize) -> Range<usize> {
        let (lo, hi) = (rank * self.per_rank, (rank + 1) * self.per_rank);
        let (start, end) = (self.offsets[i], self.offsets[i] + self.sizes[i]);
        let (a, b) = (start.max(lo), end.min(hi));
        if a >= b {
            0..0
        } else {
            a - start..b - start
        }
    }

    /// The part of member `i` this rank owns.
    pub fn owned(&self, i: usize) -> Range<usize> {
        self.owned_by(self.rank, i)
    }

    /// The rank this layout is seen from.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks the members are split over.
    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// Where member `i` starts in the group's flat order (and in the concatenation of
    /// every rank's slice).
    pub fn start(&self, i: usize) -> usize {
        self.offsets[i]
    }

    /// Where member `i`'s part sits inside rank `rank`'s slice: after the owned parts
    /// of the members before it.
    pub fn offset_in_slice(&self, rank: usize, i: usize) -> usize {
        (0..i).map(|j| self.owned_by(rank, j).len()).sum()
    }
}

/// The kind a parameter's gathered copy has (`parallel.shard: parameters`), the one
/// the model computes with: bf16 with bf16 compute for a decoder layer's parameters,
/// except the router, which classifies in fp32; fp32 for everything else (and for the
/// ends: the embedding is a lookup, the head is shared with the MTP layer, so its
/// gradient sums two uses, which fp32 master gradients add in fp32).
pub fn working_kind(name: &str, mode: ShardMode, compute: Kind) -> Kind {
    let layer = matches!(Segment::of(name), Segment::Layer(_));
    match mode == ShardMode::Parameters && compute == Kind::BFloat16 && layer {
        true if !name.contains(".router.") => Kind::BFloat16,
        _ => Kind::Float,
    }
}

/// Which ranks replicate a group's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Over {
    /// Dense tensors: every rank.
    World,
    /// Expert tensors: the replicas of one expert shard.
    Replicas,
}

/// One sharded group: one segment's parameters replicated over the same ranks (the
/// optimizer's indices), and their layout.
#[derive(Debug)]
pub(super) struct ShardGroup {
    pub(super) over: Over,
    pub(super) segment: Segment,
    /// The kind of the members' gathered copies with `parameters` (`working_kind`).
    pub(super) working: Kind,
    pub(super) members: Vec<usize>,
    pub(super) layout: FlatLayout,
}

impl ShardGroup {
    /// Whether this group's optimizer state (and, with `gradients`, its reduced
    /// gradients) is split: a shard mode, over more than one rank.
    pub(super) fn splits(&self, mode: ShardMode) -> bool {
        mode != ShardMode::None && self.layout.ranks() > 1
    }
}

/// The sharding of an optimizer's parameters over the mesh.
#[derive(Debug, Default)]
pub struct ShardPlan {
    groups: Vec<ShardGroup>,
    mode: ShardMode,
    world: usize,
}

impl ShardPlan {
    /// The plan for `params` (the optimizer's, in its order) on `par` in `mode`: dense
    /// ones over the world, expert ones over their replicas, one group per segment (a
    /// layer, or the ends) so that every rank holds 1/P of each layer and gathering or
    /// reducing one moves equal parts. A group of one rank (a world of one too) is laid
    /// out, for the reductions and the gradient norm, but not split.
    ///
    /// With a bf16 `compute` kind, a segment's parameters that `parameters` gathers as
    /// bf16 working copies (`working_kind`) form a group of their own, in every mode.
    pub fn new(
        par: &Parallel,
        params: &[(String, Tensor)],
        mode: ShardMode,
        compute: Kind,
    ) -> Self {
        let mut groups = Vec::new();
        let mut segments: Vec<Segment> = params.iter().map(|(n, _)| Segment::of(n)).collect();
        segments.sort();
        segments.dedup();
        // Grouped by the kind the gathered copy would have in every mode, so that the
        // groups, and so the order the gradient norm is summed in, are those of
        // `parameters` whatever the mode.
        let working = |i: usize| working_kind(&params[i].0, ShardMode::Parameters, compute);
        for (over, group, expert) in [
            (Over::World, &par.world, false),
            (Over::Replicas, &par.replicas, true),
        ] {
            for (&segment, kind) in segments
                .iter()
                .flat_map(|s| [(s, Kind::Float), (s, Kind::BFloat16)])
            {
                let members: Vec<usize> = (0..params.len())
                    .filter(|&i| is_expert_param(&params[i].0) == expert)
                    .filter(|&i| Segment::of(&params[i].0) == segment && working(i) == kind)
                    .collect();
                if members.is_empty() {
                    continue;
                }
                let sizes = members.iter().map(|&i| params[i].1.numel()).collect();
                groups.push(ShardGroup {
                    over,
                    segment,
                    working: kind,
                    members,
                    layout: FlatLayout::new(sizes, group.rank(), group.size()),
                });
            }
        }
        Self {
            groups,
            mode,
            world: par.world.size(),
        }
    }

    /// The shard mode.
    pub fn mode(&self) -> ShardMode {
        self.mode
    }

    /// The groups, for the reductions.
    pub(super) fn groups(&self) -> &[ShardGroup] {
        &self.groups
    }

    /// The groups whose state is split.
    fn split_groups(&self) -> impl Iterator<Item = &ShardGroup> {
        self.groups.iter().filter(|g| g.splits(self.mode))
    }

    /// The flat range of each parameter this rank updates: Some(range) for a sharded
    /// one (possibly empty), None for one it updates whole.
    pub fn owned_ranges(&self, count: usize) -> Vec<Option<Range<usize>>> {
        let mut out = vec![None; count];
        for g in self.split_groups() {
            for (k, &i) in g.members.iter().enumerate() {
                out[i] = Some(g.layout.owned(k));
            }
        }
        out
    }

    /// The flat range of each parameter (and of its moments) this rank writes to a
    /// checkpoint: its part under its group's layout, in every mode (so every mode
    /// writes the same pieces, and the replicas of a tensor share its writing). None
    /// for a world of one, which writes every tensor whole.
    pub fn saved_ranges(&self, count: usize) -> Vec<Option<Range<usize>>> {
        let mut out = vec![None; count];
        if self.world < 2 {
            return out;
        }
        for g in &self.groups {
            for (k, &i) in g.members.iter().enumerate() {
                out[i] = Some(g.layout.owned(k));
            }
        }
        out
    }

    pub(super) fn group<'a>(&self, par: &'a Parallel, g: &ShardGroup) -> &'a Group {
        match g.over {
            Over::World => &par.world,
            Over::Replicas => &par.replicas,
        }
    }

    /// After an optimizer step on the owned slices: every rank receives every slice,
    /// so each holds the whole updated parameters again.
    pub fn gather_parameters(
        &self,
        par: &Parallel,
        params: &[(String, Tensor)],
    ) -> Result<(), NcclError> {
        if self.mode == ShardMode::Parameters {
            // The slices are all there is: each layer is gathered when next computed.
            return Ok(());
        }
        for g in self.split_groups() {
            let group = self.group(par, g);
            let mine = self.owned_flat(g, |i| params[i].1.shallow_clone());
            let all = all_gather(group, &mine)?;
            tch::no_grad(|| {
                for (k, &i) in g.members.iter().enumerate() {
                    let p = &params[i].1;
                    let whole = self.assemble(g, &all, k).to_kind(p.kind());
                    p.shallow_clone().copy_(&whole.view(p.size().as_slice()));
                }
            });
        }
        Ok(())
    }

    /// Whole tensors from their owned slices (`slices[i]` the flat slice of parameter i
    /// this rank holds, `shapes[i]` its shape), on the group's first rank; None for the
    /// members of a group on its other ranks (and for unsharded ones, the slice as is).
    pub fn gather_whole(
        &self,
        par: &Parallel,
        slices: &[Tensor],
        shapes: &[Vec<i64>],
    ) -> Vec<Option<Tensor>> {
        let mut out: Vec<Option<Tensor>> = slices.iter().map(|t| Some(t.shallow_clone())).collect();
        for g in self.split_groups() {
            let group = self.group(par, g);
            let mine = self.owned_flat(g, |i| slices[i].shallow_clone());
            let host: Vec<f32> = Vec::try_from(&mine.to_device(tch::Device::Cpu))
                .expect("optimizer state converts to f32 on the host");
            let gathered = group.gather_v(&host, 0);
            for (k, &i) in g.members.iter().enumerate() {
                out[i] = gathered.as_ref().map(|(all, _)| {
                    let all = Tensor::from_slice(all);
                    self.assemble(g, &all, k)
                        .view(shapes[i].as_slice())
                        .to_kind(slices[i].kind())
                        .to_device(slices[i].device())
                });
            }
        }
        out
    }

    /// This rank's slice of group `g` as one f32 buffer of `per_rank` elements: the
    /// owned part of each member (`flat(i)` gives member i's elements, whole or just
    /// the owned part when its length says so), then zeros.
    fn owned_flat(&self, g: &ShardGroup, flat: impl Fn(usize) -> Tensor) -> Tensor {
        let mut parts = Vec::new();
        let mut len = 0;
        let mut device = tch::Device::Cpu;
        for (k, &i) in g.members.iter().enumerate() {
            let r = g.layout.owned(k);
            if r.is_empty() {
                continue;
            }
            let t = flat(i).reshape([-1]).to_kind(Kind::Float);
            device = t.device();
            let piece = match t.numel() == r.len() {
                true => t,
                false => t.narrow(0, r.start as i64, r.len() as i64),
            };
            len += r.len();
            parts.push(piece);
        }
        let pad = g.layout.per_rank() - len;
        if pad > 0 || parts.is_empty() {
            parts.push(Tensor::zeros([pad as i64], (Kind::Float, device)));
        }
        Tensor::cat(&parts, 0)
    }

    /// Member `k` of group `g`, flat, from the concatenation of every rank's slice.
    pub(super) fn assemble(&self, g: &ShardGroup, all: &Tensor, k: usize) -> Tensor {
        let per = g.layout.per_rank();
        let ranks = all.numel() / per.max(1);
        let mut parts = Vec::new();
        for rank in 0..ranks {
            let r = g.layout.owned_by(rank, k);
            if r.is_empty() {
                continue;
            }
            let before = g.layout.offset_in_slice(rank, k);
            parts.push(all.narrow(0, (rank * per + before) as i64, r.len() as i64));
        }
        Tensor::cat(&parts, 0)
    }
}

/// Every rank's `mine` (the same length on each), concatenated in rank order.
pub(super) fn all_gather(group: &Group, mine: &Tensor) -> Result<Tensor, NcclError> {
    if group.size() == 1 {
        return Ok(mine.shallow_clone());
    }
    if let Some(nccl) = group.nccl() {
        return Ok(nccl.all_gather(mine)?.reshape([-1]));
    }
    let host: Vec<f32> = Vec::try_from(&mine.to_device(tch::Device::Cpu))
        .expect("parameters convert to f32 on the host");
    let (all, _) = group.all_gather_v(&host);
    Ok(Tensor::from_slice(&all).to_device(mine.device()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_are_equal_contiguous_ranges_that_tile_every_member() {
        let sizes = vec![5, 3, 0, 9];
        for ranks in 1..=5 {
            let layout = FlatLayout::new(sizes.clone(), 0, ranks);
            assert_eq!(layout.per_rank(), CHUNK, "whole chunks per rank");
            for (i, &n) in sizes.iter().enumerate() {
                let mut covered = Vec::new();
                for r in 0..ranks {
                    covered.extend(layout.owned_by(r, i));
                }
                assert_eq!(
                    covered,
                    (0..n).collect::<Vec<_>>(),
                    "{ranks} ranks, member {i}"
                );
            }
            for r in 0..ranks {
                let held: usize = (0..sizes.len()).map(|i| layout.owned_by(r, i).len()).sum();
                assert!(held <= layout.per_rank());
            }
        }
    }
}
