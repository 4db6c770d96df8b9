//! Gradient reductions over the mesh (`GradReducer`): dense gradients summed over the
//! world, expert gradients over their replicas, so that every rank holds the gradient
//! of the global mean loss (each micro-batch's loss is scaled by one over the step's
//! canonical micro-batches, so the reduction only sums). It owns the partial sums of a
//! step's micro-batches, the reduced slices between the end of backward and the
//! optimizer step, and the gradient norm computed from them.
//!
//! The order (`parallel.reduction`). `tree`, the default: after each micro-batch's
//! backward, a segment's gradients leave the parameters as that canonical micro-batch's
//! leaf (rank p of P holds leaves p k .. (p + 1) k of the step's P k) and merge into
//! partial sums of the canonical tree (`tree`); each rank sends the partials of its
//! block, and the owner of an element finishes the tree over them. The last leaf is
//! summed into the gradient in place, so one micro-batch per rank costs no copy, and k
//! cost at most ceil(log2 k) gradient buffers. The same global batch and micro-batch
//! size then give the same bits on 1, 2, 4 ... data-parallel ranks, and with gradient
//! accumulation inside a rank. `ranks`: micro-batches accumulate in place and the
//! ranks' sums are added in rank order: deterministic for one layout only.
//!
//! A reduction is a reduce-scatter laid out by the shard plan: rank r receives, from
//! every rank, the elements of its flat slice. The shard mode only decides what
//! happens next: `none` all-gathers the slices back into the full gradients,
//! `optimizer` writes each slice into the owned range of the full gradient, `gradients`
//! (and `parameters`) keeps the slices and frees the full gradients. So every mode
//! computes the same bits, and so does the norm: each chunk's squares summed in a fixed
//! tree of elementwise adds, the chunks in the canonical tree over the group's chunks.
//!
//! Buckets are a model segment's parameters (one layer, or the embedding, head, final
//! norm and MTP layer: "the ends"). With overlap, a bucket's reduce-scatter starts,
//! nonblocking, as soon as the segment's backward of the step's last micro-batch is
//! done; the optimizer waits for all of them.

use super::mesh::{Parallel, Segment};
use super::shard::{all_gather, ShardGroup, ShardPlan, CHUNK};
use super::tree::{Partials, Tree};
use crate::recipe::{Reduction, ShardMode};
use catapult_kernels::comm::Pending;
use catapult_kernels::NcclError;
use std::ops::Range;
use std::time::Instant;
use tch::{Kind, Tensor};

/// A bucket's rows on their way: from the host communicator, or already here.
enum Arrival {
    Host(Pending<f32>),
    Here(Tensor),
}

/// One group's part of a started bucket.
struct Flight {
    group: usize,
    /// The live members (indices within the group) whose parts travel, in order.
    members: Vec<usize>,
    arrival: Arrival,
}

/// The step's gradient reductions, bucket by bucket.
pub struct GradReducer {
    /// Per bucket (layer 0, 1, ..., then the ends), the optimizer indices it holds.
    buckets: Vec<Vec<usize>>,
    /// Per parameter: its (group, member index) in the shard plan.
    place: Vec<Option<(usize, usize)>>,
    started: Vec<bool>,
    flights: Vec<Flight>,
    /// Per group: this rank's slice of the reduced gradients (f32, `per_rank` elements,
    /// each value rounded through its parameter's kind), while a step has one.
    slices: Vec<Option<Tensor>>,
    /// Per parameter: some rank had a gradient for it this step.
    live: Vec<bool>,
    /// Per parameter: its full gradient was freed after its reduction (`gradients`).
    freed: Vec<bool>,
    order: Reduction,
    /// Micro-batches per step on this rank: the leaves of its block.
    micro: usize,
    /// Per group: the canonical tree over its ranks' micro-batches and this rank's
    /// position among them.
    trees: Vec<(Tree, usize)>,
    /// Per parameter (`tree`): the open partial sums of this step's micro-batches.
    partials: Vec<Partials<Tensor>>,
    /// Per parameter (`tree`): the node the gradient itself holds, when the last leaf
    /// was summed into it in place.
    in_place: Vec<Option<Range<usize>>>,
    /// Per parameter (`tree`): some micro-batch of this rank had a gradient for it.
    touched: Vec<bool>,
    device: tch::Device,
    exposed_s: f64,
    sent_bytes: u64,
}

fn has_grad(p: &Tensor) -> bool {
    let g = p.grad();
    g.defined() && g.numel() == p.numel()
}

/// Gives `p` a zero gradient of its shape where it has none (or a freed one).
pub(super) fn ensure_grad(p: &Tensor) {
    let mut g = p.grad();
    if !g.defined() {
        // A parameter this rank did not touch: a zero gradient, so that the reduced
        // one has somewhere to go.
        (p.sum(Kind::Float) * 0.0).backward();
    } else if g.numel() != p.numel() {
        tch::no_grad(|| {
            let _ = g.resize_(p.size().as_slice()).zero_();
        });
    }
}

impl GradReducer {
    /// The reductions of `params` (the optimizer's, in its order) laid out by `plan` on
    /// `par`, of `micro` micro-batches per rank and step, summed in `order`.
    pub fn new(
        plan: &ShardPlan,
        par: &Parallel,
        params: &[(String, Tensor)],
        (micro, order): (usize, Reduction),
    ) -> Self {
        let segments: Vec<Segment> = params.iter().map(|(n, _)| Segment::of(n)).collect();
        let layers = Segment::layer_count(segments.iter().copied());
        let mut buckets = vec![Vec::new(); layers + 1];
        for (i, s) in segments.iter().enumerate() {
            buckets[Self::bucket_of(layers, *s)].push(i);
        }
        let mut place = vec![None; params.len()];
        for (g, group) in plan.groups().iter().enumerate() {
            for (k, &i) in group.members.iter().enumerate() {
                place[i] = Some((g, k));
            }
        }
        let device = params.first().map_or(tch::Device::Cpu, |(_, p)| p.device());
        let trees = plan
            .groups()
            .iter()
            .map(|g| {
                let comm = plan.group(par, g);
                (Tree::new(comm.size() * micro.max(1)), comm.rank())
            })
            .collect();
        Self {
            order,
            micro: micro.max(1),
            trees,
            partials: params.iter().map(|_| Partials::default()).collect(),
            in_place: vec![None; params.len()],
            touched: vec![false; params.len()],
            started: vec![false; buckets.len()],
            buckets,
            place,
            flights: Vec::new(),
            slices: plan.groups().iter().map(|_| None).collect(),
            live: vec![false; params.len()],
            freed: vec![false; params.len()],
            device,
            exposed_s: 0.0,
            sent_bytes: 0,
        }
    }

    fn bucket_of(layers: usize, s: Segment) -> usize {
        match s {
            Segment::Layer(l) => l,
            Segment::Ends => layers,
        }
    }

    fn bucket(&self, s: Segment) -> usize {
        Self::bucket_of(self.buckets.len() - 1, s)
    }

    /// Before a segment's backward: its freed full gradients exist again (zeros), as
    /// an unsharded run's zeroed gradients do.
    pub fn restore(&mut self, segment: Segment, params: &[(String, Tensor)]) {
        let b = self.bucket(segment);
        for &i in &self.buckets[b] {
            if std::mem::take(&mut self.freed[i]) {
                ensure_grad(&params[i].1);
            }
        }
    }

    /// This rank's block of group `g`'s canonical leaves.
    fn block(&self, rank: usize) -> Range<usize> {
        rank * self.micro..(rank + 1) * self.micro
    }

    /// After micro-batch `micro`'s backward of `segment` (`tree`): its gradients become
    /// that canonical micro-batch's leaf and merge into the partial sums; the
    /// gradients are zero again for the next micro-batch, except after the last, which
    /// is summed into them in place.
    pub fn collect(&mut self, segment: Segment, micro: usize, params: &[(String, Tensor)]) {
        if self.order != Reduction::Tree {
            return;
        }
        let b = self.bucket(segment);
        for k in 0..self.buckets[b].len() {
            let i = self.buckets[b][k];
            let Some((g, _)) = self.place[i] else {
                continue;
            };
            let (tree, rank) = self.trees[g];
            let leaf = self.block(rank).start + micro;
            let p = &params[i].1;
            let defined = has_grad(p);
            self.touched[i] |= defined;
            let grad = p.grad();
            let last = micro + 1 == self.micro;
            tch::no_grad(|| {
                if last && defined && grad.kind() == Kind::Float {
                    let mut node = leaf..leaf + 1;
                    while let Some((open, _)) = self.partials[i].nodes().last() {
                        if !tree.siblings(open, &node) {
                            break;
                        }
                        let (left, partial) = self.partials[i].pop().expect("checked above");
                        let _ = grad.shallow_clone().g_add_(&partial);
                        node = left.start..node.end;
                    }
                    self.in_place[i] = Some(node);
                    return;
                }
                let add = &mut |mut a: Tensor, b: Tensor| {
                    a += &b;
                    a
                };
                let sibling = self.partials[i]
                    .nodes()
                    .last()
                    .is_some_and(|(open, _)| tree.siblings(open, &(leaf..leaf + 1)));
                match (defined, sibling) {
                    (true, true) => {
                        // A right child: added into its left sibling's partial, no copy.
                        let (left, mut partial) = self.partials[i].pop().expect("checked above");
                        partial += grad.to_kind(Kind::Float);
                        let _ = grad.shallow_clone().zero_();
                        self.partials[i].push_node(&tree, left.start..leaf + 1, partial, add);
                    }
                    (true, false) => {
                        let v = grad.to_kind(Kind::Float).copy();
                        let _ = grad.shallow_clone().zero_();
                        self.partials[i].push(&tree, leaf, v, add);
                    }
                    (false, _) => {
                        let zeros = Tensor::zeros(p.size().as_slice(), (Kind::Float, p.device()));
                        self.partials[i].push(&tree, leaf, zeros, add);
                    }
                }
            });
        }
    }

    /// `collect` for every segment (after a replayed micro-batch, whose hooks did not).
    pub fn collect_all(&mut self, micro: usize, params: &[(String, Tensor)]) {
        let layers = self.buckets.len() - 1;
        for s in (0..layers).map(Segment::Layer).chain([Segment::Ends]) {
            self.collect(s, micro, params);
        }
    }

    /// The partial sums parameter `i` sends, flat, in canonical order: with `tree`,
    /// its open partials then the gradient holding the last node; with `ranks`, the
    /// gradient.
    fn node_values(&self, i: usize, params: &[(String, Tensor)]) -> Vec<Tensor> {
        let grad = || params[i].1.grad().reshape([-1]);
        match self.order {
            Reduction::Ranks => vec![grad()],
            Reduction::Tree => {
                let mut out: Vec<Tensor> = self.partials[i]
                    .nodes()
                    .iter()
                    .map(|(_, t)| t.reshape([-1]))
                    .collect();
                if self.in_place[i].is_some() {
                    out.push(grad());
                }
                out
            }
        }
    }

    /// The nodes rank `rank` of group `g` sends (one with `ranks`).
    fn sent_nodes(&self, g: usize, rank: usize) -> usize {
        match self.order {
            Reduction::Ranks => 1,
            Reduction::Tree => self.trees[g].0.nodes_within(self.block(rank)).len(),
        }
    }

    fn slice(&mut self, plan: &ShardPlan, g: usize) -> &Tensor {
        let per = plan.groups()[g].layout.per_rank() as i64;
        let device = self.device;
        self.slices[g].get_or_insert_with(|| Tensor::zeros([per], (Kind::Float, device)))
    }

    /// Starts reducing `segment`'s gradients (once per step): which of them any rank
    /// has is agreed over the world, then each group's parts leave for their owners.
    pub fn start(
        &mut self,
        segment: Segment,
        par: &Parallel,
        plan: &ShardPlan,
        params: &[(String, Tensor)],
    ) -> Result<(), NcclError> {
        let b = self.bucket(segment);
        if std::mem::replace(&mut self.started[b], true) {
            return Ok(());
        }
        let t0 = Instant::now();
        let members = self.buckets[b].clone();
        let mut defined: Vec<i32> = members
            .iter()
            .map(|&i| match self.order {
                Reduction::Tree => i32::from(self.touched[i]),
                Reduction::Ranks => i32::from(has_grad(&params[i].1)),
            })
            .collect();
        par.world.all_reduce_sum(&mut defined);
        for (&i, &d) in members.iter().zip(&defined) {
            self.live[i] = d > 0;
            if d > 0 {
                ensure_grad(&params[i].1);
            }
        }
        for (g, group) in plan.groups().iter().enumerate() {
            let ks: Vec<usize> = members
                .iter()
                .filter(|&&i| self.live[i])
                .filter_map(|&i| self.place[i].filter(|(gi, _)| *gi == g).map(|(_, k)| k))
                .collect();
            if ks.is_empty() {
                continue;
            }
            let arrival = self.send(par, plan, (g, group), &ks, params)?;
            for &k in &ks {
                // Sent (the send buffer is a copy): the partial sums are done with.
                let i = group.members[k];
                let _ = self.partials[i].take();
            }
            self.flights.push(Flight {
                group: g,
                members: ks.clone(),
                arrival,
            });
            if plan.mode().keeps_gradient_slices() && group.splits(plan.mode()) {
                for &k in &ks {
                    let i = group.members[k];
                    let _ = params[i].1.grad().set_();
                    self.freed[i] = true;
                }
            }
        }
        self.exposed_s += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// Packs the partial sums of members `ks` of group `g` by destination rank (for
    /// each destination: node by node, member by member, the owned part) and starts the
    /// exchange.
    fn send(
        &mut self,
        par: &Parallel,
        plan: &ShardPlan,
        (g, group): (usize, &ShardGroup),
        ks: &[usize],
        params: &[(String, Tensor)],
    ) -> Result<Arrival, NcclError> {
        let layout = &group.layout;
        let ranks = layout.ranks();
        let (mut pieces, mut counts) = (Vec::new(), vec![0usize; ranks]);
        let nodes: Vec<Vec<Tensor>> = ks
            .iter()
            .map(|&k| self.node_values(group.members[k], params))
            .collect();
        let sent = self.sent_nodes(g, layout.rank());
        debug_assert!(
            nodes.iter().all(|n| n.len() == sent),
            "one node list per group"
        );
        for (r, count) in counts.iter_mut().enumerate() {
            for n in 0..sent {
                for (&k, values) in ks.iter().zip(&nodes) {
                    let own = layout.owned_by(r, k);
                    if !own.is_empty() {
                        *count += own.len();
                        pieces.push(values[n].narrow(0, own.start as i64, own.len() as i64));
                    }
                }
            }
        }
        let me = layout.rank();
        let mine: usize = ks.iter().map(|&k| layout.owned(k).len()).sum();
        let receive: Vec<usize> = (0..ranks).map(|s| self.sent_nodes(g, s) * mine).collect();
        let send = tch::no_grad(|| Tensor::cat(&pieces, 0).to_kind(Kind::Float));
        let comm = plan.group(par, group);
        self.sent_bytes += ((send.numel() - counts[me]) * 4) as u64;
        if ranks == 1 {
            return Ok(Arrival::Here(send));
        }
        if let Some(nccl) = comm.nccl() {
            return Ok(Arrival::Here(
                nccl.all_to_all_rows(&send, &counts, &receive)?,
            ));
        }
        let host: Vec<f32> = Vec::try_from(&send.to_device(tch::Device::Cpu))
            .expect("gradients convert to f32 on the host");
        Ok(Arrival::Host(
            comm.start_all_to_all_v(host, &counts, &receive),
        ))
    }

    /// What arrived for group `g`, summed: with `tree`, every rank's partials (flat,
    /// `mine` elements each) combined in the canonical tree; with `ranks`, the ranks'
    /// rows in rank order.
    fn sum_arrived(&self, g: usize, received: &Tensor, mine: i64) -> Tensor {
        let (tree, _) = self.trees[g];
        let ranks = tree.leaves() / self.micro;
        tch::no_grad(|| match self.order {
            Reduction::Ranks => {
                let rows = received.view([ranks as i64, mine]);
                let mut acc = rows.get(0).copy();
                for src in 1..ranks as i64 {
                    acc += rows.get(src);
                }
                acc
            }
            Reduction::Tree => {
                let mut parts = Vec::new();
                let mut at = 0;
                for src in 0..ranks {
                    for node in tree.nodes_within(self.block(src)) {
                        parts.push((node, received.narrow(0, at, mine)));
                        at += mine;
                    }
                }
                tree.combine(0..tree.leaves(), parts, &mut |a, b| a + b)
                    .expect("every rank's partials tile the canonical tree")
            }
        })
    }

    /// Adds what arrived for one flight, in rank order, into its group's slice.
    fn land(&mut self, plan: &ShardPlan, params: &[(String, Tensor)], f: Flight) {
        let group = &plan.groups()[f.group];
        let layout = &group.layout;
        let received = match f.arrival {
            Arrival::Host(p) => Tensor::from_slice(&p.wait().0).to_device(self.device),
            Arrival::Here(t) => t,
        };
        let mine: usize = f.members.iter().map(|&k| layout.owned(k).len()).sum();
        let summed = self.sum_arrived(f.group, &received, mine as i64);
        let me = layout.rank();
        let slice = self.slice(plan, f.group).shallow_clone();
        let mut at = 0;
        tch::no_grad(|| {
            for &k in &f.members {
                let n = layout.owned(k).len() as i64;
                if n == 0 {
                    continue;
                }
                let kind = params[group.members[k]].1.kind();
                let value = summed.narrow(0, at, n).to_kind(kind).to_kind(Kind::Float);
                let off = layout.offset_in_slice(me, k) as i64;
                slice.narrow(0, off, n).copy_(&value);
                at += n;
            }
        });
    }

    /// Lets the host exchanges in flight progress; lands the ones that completed.
    pub fn progress(&mut self, plan: &ShardPlan, params: &[(String, Tensor)]) {
        let mut waiting = Vec::new();
        for mut f in std::mem::take(&mut self.flights) {
            let done = match &mut f.arrival {
                Arrival::Host(p) => p.test(),
                Arrival::Here(_) => true,
            };
            match done {
                true => self.land(plan, params, f),
                false => waiting.push(f),
            }
        }
        self.flights = waiting;
    }

    /// Starts every bucket not started yet and waits for all: afterwards each group's
    /// slice holds this rank's part of the reduced gradients.
    pub fn finish(
        &mut self,
        par: &Parallel,
        plan: &ShardPlan,
        params: &[(String, Tensor)],
    ) -> Result<(), NcclError> {
        let t0 = Instant::now();
        let layers = self.buckets.len() - 1;
        for s in (0..layers).map(Segment::Layer).chain([Segment::Ends]) {
            self.start(s, par, plan, params)?;
        }
        for f in std::mem::take(&mut self.flights) {
            self.land(plan, params, f);
        }
        self.exposed_s += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// The squared L2 norm of the reduced gradients: (dense, this expert shard's),
    /// each group's the canonical tree over its chunks (`chunk_squares` each), the
    /// groups added in order: the same bits in every mode and on any number of ranks.
    pub fn squared_norms(&mut self, par: &Parallel, plan: &ShardPlan) -> (f64, f64) {
        let mut out = (0.0, 0.0);
        for (g, group) in plan.groups().iter().enumerate() {
            let chunks = chunk_squares(self.slice(plan, g));
            let (per, rank) = (chunks.len(), group.layout.rank());
            let tree = Tree::new(per * group.layout.ranks());
            let add = &mut |a: f64, b: f64| a + b;
            let mut mine = Partials::default();
            for (c, &v) in chunks.iter().enumerate() {
                mine.push(&tree, rank * per + c, v, add);
            }
            let values: Vec<f64> = mine.take().into_iter().map(|(_, v)| v).collect();
            let (all, _) = plan.group(par, group).all_gather_v(&values);
            let nodes =
                (0..group.layout.ranks()).flat_map(|r| tree.nodes_within(r * per..(r + 1) * per));
            let parts: Vec<(Range<usize>, f64)> = nodes.zip(all).collect();
            let total = tree
                .combine(0..tree.leaves(), parts, add)
                .expect("every rank's chunk partials tile the group");
            match group.over {
                super::shard::Over::World => out.0 += total,
                super::shard::Over::Replicas => out.1 += total,
            }
        }
        out
    }

    /// Scales the reduced gradients by `factor` (clipping).
    pub fn scale(&mut self, factor: f64) {
        tch::no_grad(|| {
            for s in self.slices.iter_mut().flatten() {
                let _ = s.g_mul_scalar_(factor);
            }
        });
    }

    /// Puts the reduced slices where the optimizer reads them: whole gradients
    /// (all-gathered) where the group's optimizer state is not split; the owned range of
    /// the full gradient with `optimizer`; nothing with `gradients` (`gradient` reads
    /// the slices).
    pub fn write_back(
        &mut self,
        par: &Parallel,
        plan: &ShardPlan,
        params: &[(String, Tensor)],
    ) -> Result<(), NcclError> {
        let t0 = Instant::now();
        for (g, group) in plan.groups().iter().enumerate() {
            let slice = self.slice(plan, g).shallow_clone();
            let live: Vec<usize> = (0..group.members.len())
                .filter(|&k| self.live[group.members[k]])
                .collect();
            if live.is_empty() {
                continue;
            }
            let layout = &group.layout;
            if !group.splits(plan.mode()) {
                let all = all_gather(plan.group(par, group), &slice)?;
                tch::no_grad(|| {
                    for &k in &live {
                        let p = &params[group.members[k]].1;
                        let whole = plan.assemble(group, &all, k);
                        let whole = whole.view(p.size().as_slice()).to_kind(p.kind());
                        p.grad().copy_(&whole);
                    }
                });
            } else if plan.mode() == ShardMode::Optimizer {
                tch::no_grad(|| {
                    for &k in &live {
                        let p = &params[group.members[k]].1;
                        let own = layout.owned(k);
                        if own.is_empty() {
                            continue;
                        }
                        let (at, n) = (own.start as i64, own.len() as i64);
                        let off = layout.offset_in_slice(layout.rank(), k) as i64;
                        let value = slice.narrow(0, off, n).to_kind(p.kind());
                        p.grad().view([-1]).narrow(0, at, n).copy_(&value);
                    }
                });
            }
        }
        if !plan.mode().keeps_gradient_slices() {
            // Written where the optimizer reads them: the slices are done with.
            self.slices.iter_mut().for_each(|s| *s = None);
        }
        self.exposed_s += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// The gradient the optimizer applies to parameter `i`: None when no rank had one;
    /// with `gradients`, the owned range of the reduced slice (flat, possibly empty);
    /// otherwise the parameter's full gradient.
    pub fn gradient(
        &self,
        plan: &ShardPlan,
        params: &[(String, Tensor)],
        i: usize,
    ) -> Option<Tensor> {
        if !self.live[i] {
            return None;
        }
        let p = &params[i].1;
        match self.place[i] {
            Some((g, k)) if plan.mode().keeps_gradient_slices() => {
                let group = &plan.groups()[g];
                if !group.splits(plan.mode()) {
                    return Some(p.grad());
                }
                let layout = &group.layout;
                let n = layout.owned(k).len() as i64;
                let off = layout.offset_in_slice(layout.rank(), k) as i64;
                let slice = self.slices[g].as_ref().expect("the step's slice exists");
                Some(slice.narrow(0, off, n).to_kind(p.kind()))
            }
            _ => Some(p.grad()),
        }
    }

    /// Bytes of reduced slices held now.
    pub fn held_bytes(&self) -> u64 {
        self.slices
            .iter()
            .flatten()
            .map(|s| (s.numel() * 4) as u64)
            .sum()
    }

    /// Ends the step: the slices are dropped and the counters returned (seconds spent
    /// reducing outside the overlap, bytes this rank sent).
    pub fn end_step(&mut self) -> (f64, u64) {
        self.slices.iter_mut().for_each(|s| *s = None);
        self.partials.iter_mut().for_each(|p| drop(p.take()));
        self.in_place.iter_mut().for_each(|n| *n = None);
        self.touched.iter_mut().for_each(|t| *t = false);
        self.started.iter_mut().for_each(|s| *s = false);
        self.live.iter_mut().for_each(|l| *l = false);
        (
            std::mem::take(&mut self.exposed_s),
            std::mem::take(&mut self.sent_bytes),
        )
    }
}

/// Each `CHUNK` of `slice`'s elements' squares (in f64, exact for f32 values) summed
/// by halving: the same elementwise adds whatever the number of chunks or the device.
fn chunk_squares(slice: &Tensor) -> Vec<f64> {
    tch::no_grad(|| {
        let mut x = slice
            .to_kind(Kind::Double)
            .view([-1, CHUNK as i64])
            .square();
        let mut width = CHUNK as i64;
        while width > 1 {
            width /= 2;
            x = x.narrow(1, 0, width) + x.narrow(1, width, width);
        }
        Vec::try_from(&x.reshape([-1]).to_device(tch::Device::Cpu)).expect("f64 chunk sums")
    })
}
