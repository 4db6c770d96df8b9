//! Sharded parameters (`parallel.shard: parameters`, ZeRO-3): between passes a rank
//! holds only its flat slice of each split group's parameters, in fp32 (the master
//! weights the optimizer updates). A segment's whole parameters exist only in gather
//! buffers: each parameter tensor of a split group permanently points into one, and a
//! segment's values are all-gathered into it just before the segment is computed
//! (forward, backward, or its recomputation).
//!
//! Buffers are shared by segments that are never needed at once: the ends have their
//! own, even layers share one and odd layers another (per group kind, dense and expert).
//! Autograd keeps a layer's parameters for its backward as the tensors themselves, so
//! they see whatever the buffer holds; the schedule gathers layer l again before its
//! backward, when layer l + 2, which overwrote it, is done with. So a rank holds 1/P of
//! the parameters plus the ends and two layers, whatever the depth.
//!
//! With bf16 compute, a layer's parameters (but its router) are gathered as bf16
//! working copies (`shard::working_kind`): half the bytes on the wire and in the
//! buffers. The model's tensor is then a bf16 leaf, so autograd gives it bf16 gradients;
//! after each segment's backward they are added, in fp32, into an fp32 stand-in that
//! the optimizer and the reductions see in its place, which is what an unsharded bf16
//! run computes (its fp32 parameters' casts give the same bf16 gradients, added in
//! fp32). Masters, moments and reductions stay fp32.
//!
//! Gathers are nonblocking: while layer l computes, layer l + 1's (forward) or l - 1's
//! (backward) is in flight (`prefetch`); `ensure` waits for it. A buffer that already
//! holds the segment (the last two layers of a forward are the first two of its
//! backward; the first two of a backward the first two of the next micro-batch's
//! forward) is not gathered again until the optimizer changes the slices.

use super::mesh::{Parallel, Segment};
use super::schedule::SegmentHooks;
use super::shard::{Over, ShardGroup, ShardPlan};
use crate::recipe::ShardMode;
use catapult_kernels::comm::Pending;
use catapult_kernels::{CommError, NcclError};
use std::ops::Range;
use std::time::Instant;
use tch::{Kind, Tensor};

/// A group's gathered values on their way (bf16 travels as its bits).
enum Incoming {
    Host(Pending<f32>),
    HostBf16(Pending<i16>),
    Here(Tensor),
}

/// Buffers: per kind of group (dense, expert), part (ends, even layer, odd layer) and
/// working kind (fp32, bf16).
const BUFFERS: usize = 12;

/// Which buffer a group is gathered into.
fn buffer_key(group: &ShardGroup) -> usize {
    let part = match group.segment {
        Segment::Ends => 0,
        Segment::Layer(l) => 1 + l % 2,
    };
    let over = match group.over {
        Over::World => 0,
        Over::Replicas => 1,
    };
    (over * 3 + part) * 2 + usize::from(group.working == Kind::BFloat16)
}

/// A parameter with a bf16 working copy.
struct Working {
    /// Its index among the optimizer's parameters.
    index: usize,
    segment: Segment,
    /// The model's tensor: a bf16 leaf in its buffer.
    model: Tensor,
    /// What the optimizer and the reductions see: an fp32 leaf of the same shape (no
    /// storage of its own) whose gradient is the fp32 sum of the working copy's.
    stand_in: Tensor,
    /// The working copy's gradient was freed after being added (it is made again,
    /// zero, before the segment's next backward).
    freed: bool,
}

/// The parameters of a `parameters`-sharded run: the slices and the gather buffers.
pub struct ParamGather {
    /// Per plan group: this rank's fp32 slice (`per_rank` elements) when it is split.
    masters: Vec<Option<Tensor>>,
    /// Per plan group: the buffer its whole values are gathered into.
    buffer_of: Vec<Option<usize>>,
    /// Flat buffers, each as long as the largest group gathered into it.
    buffers: Vec<Option<Tensor>>,
    /// Per buffer: the segment whose current values it holds.
    holds: Vec<Option<Segment>>,
    /// A segment whose gather is in flight, with its groups' arrivals.
    prefetch: Option<(Segment, Vec<(usize, Incoming)>)>,
    /// Per parameter: its (group, member) when it is split.
    place: Vec<Option<(usize, usize)>>,
    /// Decoder layers.
    layers: usize,
    /// The parameters with bf16 working copies.
    working: Vec<Working>,
    exposed_s: f64,
    received_bytes: u64,
}

impl ParamGather {
    /// Takes over `params` (the model's, in the optimizer's order, declared but not
    /// drawn) for `plan`: each rank keeps its slices, drawn by `values(i, range)` (the
    /// flat `range` of parameter i's initial value), and every split parameter is
    /// pointed into its gather buffer; no rank ever holds a whole one. None unless the
    /// plan shards parameters.
    pub fn new(
        plan: &ShardPlan,
        params: &[(String, Tensor)],
        values: &dyn Fn(usize, Range<usize>) -> Tensor,
    ) -> Option<Self> {
        if plan.mode() != ShardMode::Parameters {
            return None;
        }
        let groups = plan.groups();
        let device = params.first().map_or(tch::Device::Cpu, |(_, p)| p.device());
        let mut masters = Vec::with_capacity(groups.len());
        let mut buffer_of = Vec::with_capacity(groups.len());
        let mut capacity = [0usize; BUFFERS];
        let mut place = vec![None; params.len()];
        for (g, group) in groups.iter().enumerate() {
            if !group.splits(plan.mode()) {
                masters.push(None);
                buffer_of.push(None);
                continue;
            }
            masters.push(Some(drawn_slice(group, values, device)));
            let key = buffer_key(group);
            let whole = group.layout.per_rank() * group.layout.ranks();
            capacity[key] = capacity[key].max(whole);
            buffer_of.push(Some(key));
            for (k, &i) in group.members.iter().enumerate() {
                place[i] = Some((g, k));
            }
        }
        let buffers: Vec<Option<Tensor>> = (0..BUFFERS)
            .map(|key| {
                let kind = [Kind::Float, Kind::BFloat16][key % 2];
                (capacity[key] > 0).then(|| Tensor::zeros([capacity[key] as i64], (kind, device)))
            })
            .collect();
        let working = point_into_buffers(plan, params, (&buffer_of, &buffers));
        let layers = Segment::layer_count(groups.iter().map(|g| g.segment));
        Some(Self {
            layers,
            working,
            masters,
            buffer_of,
            holds: vec![None; buffers.len()],
            buffers,
            prefetch: None,
            place,
            exposed_s: 0.0,
            received_bytes: 0,
        })
    }

    /// The optimizer's parameters in place of `params`: each one with a bf16 working
    /// copy replaced by its fp32 stand-in.
    pub fn optimizer_params(&self, params: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
        let mut out = params;
        for w in &self.working {
            out[w.index].1 = w.stand_in.shallow_clone();
        }
        out
    }

    /// Before `segment`'s backward: its working copies' freed gradients exist again
    /// (zeros), so autograd accumulates into them.
    fn restore_working(&mut self, segment: Segment) {
        for w in self.working.iter_mut().filter(|w| w.segment == segment) {
            if std::mem::take(&mut w.freed) {
                super::reduce::ensure_grad(&w.model);
            }
        }
    }

    /// After `segment`'s backward: its working copies' bf16 gradients are added, in
    /// fp32, to their stand-ins' and freed.
    fn add_working_gradients(&mut self, segment: Segment) {
        for w in self.working.iter_mut().filter(|w| w.segment == segment) {
            let g = w.model.grad();
            if !g.defined() || g.numel() != w.model.numel() {
                continue;
            }
            super::reduce::ensure_grad(&w.stand_in);
            tch::no_grad(|| {
                let mut acc = w.stand_in.grad();
                acc += g.to_kind(Kind::Float);
                let _ = g.shallow_clone().set_();
            });
            w.freed = true;
        }
    }

    /// Whether parameter `i` lives as slices here.
    pub fn holds_slices_of(&self, i: usize) -> bool {
        self.place[i].is_some()
    }

    /// The flat part of parameter `i` this rank keeps (a view of its slice; possibly
    /// empty), for the optimizer to update; None for a parameter held whole.
    pub fn master(&self, plan: &ShardPlan, i: usize) -> Option<Tensor> {
        let (g, k) = self.place[i]?;
        let layout = &plan.groups()[g].layout;
        let off = layout.offset_in_slice(layout.rank(), k) as i64;
        let n = layout.owned(k).len() as i64;
        let master = self.masters[g].as_ref().expect("split groups have slices");
        Some(master.narrow(0, off, n))
    }

    /// The flat range of parameter `i` this rank holds as its slice (None when it is
    /// held whole).
    pub fn owned(&self, plan: &ShardPlan, i: usize) -> Option<std::ops::Range<usize>> {
        let (g, k) = self.place[i]?;
        Some(plan.groups()[g].layout.owned(k))
    }

    /// Writes `part` (this rank's part of parameter `i`, flat, e.g. from a checkpoint)
    /// into its slice; false when parameter `i` is held whole.
    pub fn load(&mut self, plan: &ShardPlan, i: usize, part: &Tensor) -> bool {
        let Some(mut master) = self.master(plan, i) else {
            return false;
        };
        tch::no_grad(|| {
            master.copy_(
                &part
                    .reshape([-1])
                    .to_kind(Kind::Float)
                    .to_device(master.device()),
            );
        });
        self.invalidate();
        true
    }

    /// The slices changed (an optimizer step, a restore): no buffer holds current
    /// values any more.
    pub fn invalidate(&mut self) {
        self.prefetch = None;
        self.holds.iter_mut().for_each(|h| *h = None);
    }

    /// The split groups of `segment`.
    fn groups_of(&self, plan: &ShardPlan, segment: Segment) -> Vec<usize> {
        (0..plan.groups().len())
            .filter(|&g| self.buffer_of[g].is_some() && plan.groups()[g].segment == segment)
            .collect()
    }

    /// Whether every buffer of `segment` holds its values.
    fn resident(&self, plan: &ShardPlan, segment: Segment) -> bool {
        self.groups_of(plan, segment)
            .iter()
            .all(|&g| self.holds[self.buffer_of[g].expect("split")] == Some(segment))
    }

    fn start_group(
        &mut self,
        par: &Parallel,
        plan: &ShardPlan,
        g: usize,
    ) -> Result<Incoming, NcclError> {
        let group = &plan.groups()[g];
        let comm = plan.group(par, group);
        let mine = self.masters[g].as_ref().expect("split groups have slices");
        let per = group.layout.per_rank();
        let mine = mine.to_kind(group.working);
        self.received_bytes +=
            (per * (group.layout.ranks() - 1) * mine.kind().elt_size_in_bytes()) as u64;
        if let Some(nccl) = comm.nccl() {
            return Ok(Incoming::Here(nccl.all_gather(&mine)?.reshape([-1])));
        }
        let host = mine.to_device(tch::Device::Cpu);
        Ok(match group.working {
            Kind::BFloat16 => {
                let bits: Vec<i16> = Vec::try_from(&host.view_dtype(Kind::Int16))
                    .expect("bf16 slices read as their bits");
                Incoming::HostBf16(comm.start_all_gather(bits))
            }
            _ => {
                let host: Vec<f32> =
                    Vec::try_from(&host).expect("parameter slices convert to f32 on the host");
                Incoming::Host(comm.start_all_gather(host))
            }
        })
    }

    fn land(&mut self, segment: Segment, g: usize, incoming: Incoming) {
        let key = self.buffer_of[g].expect("split");
        let values = match incoming {
            Incoming::Host(p) => Tensor::from_slice(&p.wait().0),
            Incoming::HostBf16(p) => Tensor::from_slice(&p.wait().0).view_dtype(Kind::BFloat16),
            Incoming::Here(t) => t,
        };
        let buffer = self.buffers[key]
            .as_ref()
            .expect("a buffer for every key in use");
        tch::no_grad(|| {
            let n = values.numel() as i64;
            buffer
                .narrow(0, 0, n)
                .copy_(&values.to_device(buffer.device()));
        });
        self.holds[key] = Some(segment);
    }

    /// Starts gathering `segment`'s parameters unless its buffers hold them or they are
    /// on their way; what was prefetched before and not used is dropped.
    pub fn prefetch(
        &mut self,
        par: &Parallel,
        plan: &ShardPlan,
        segment: Segment,
    ) -> Result<(), NcclError> {
        if self.resident(plan, segment) || self.prefetch.as_ref().is_some_and(|p| p.0 == segment) {
            return Ok(());
        }
        let t0 = Instant::now();
        let mut flights = Vec::new();
        for g in self.groups_of(plan, segment) {
            flights.push((g, self.start_group(par, plan, g)?));
        }
        self.prefetch = Some((segment, flights));
        self.exposed_s += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// Lets a prefetch in flight progress (Open MPI moves it only inside MPI calls).
    pub fn progress(&mut self) {
        if let Some((_, flights)) = &mut self.prefetch {
            for (_, f) in flights.iter_mut() {
                match f {
                    Incoming::Host(p) => {
                        p.test();
                    }
                    Incoming::HostBf16(p) => {
                        p.test();
                    }
                    Incoming::Here(_) => {}
                }
            }
        }
    }

    /// Makes `segment`'s whole parameters present in their buffers: at once when they
    /// are there, else from its prefetch, else gathered now.
    pub fn ensure(
        &mut self,
        par: &Parallel,
        plan: &ShardPlan,
        segment: Segment,
    ) -> Result<(), NcclError> {
        if self.resident(plan, segment) {
            return Ok(());
        }
        let t0 = Instant::now();
        let flights = match self.prefetch.take() {
            Some((s, flights)) if s == segment => flights,
            _ => {
                let mut flights = Vec::new();
                for g in self.groups_of(plan, segment) {
                    flights.push((g, self.start_group(par, plan, g)?));
                }
                flights
            }
        };
        for (g, f) in flights {
            self.land(segment, g, f);
        }
        self.exposed_s += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// Bytes held in parameter slices and gather buffers.
    pub fn held_bytes(&self) -> u64 {
        let bytes = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        let slices: u64 = self.masters.iter().flatten().map(bytes).sum();
        slices + self.buffers.iter().flatten().map(bytes).sum::<u64>()
    }

    /// The step's counters, reset: seconds spent gathering that computation did not
    /// hide, and bytes received.
    pub fn end_step(&mut self) -> (f64, u64) {
        (
            std::mem::take(&mut self.exposed_s),
            std::mem::take(&mut self.received_bytes),
        )
    }
}

/// The hooks that gather sharded parameters around each segment: before its forward
/// (prefetching the next layer's) and before its backward (prefetching the previous
/// layer's); without `parallel.overlap`, nothing is prefetched. Without a
/// `ParamGather` they do nothing.
pub struct Gathering<'a> {
    /// The run's sharded parameters, if any.
    pub gather: Option<&'a mut ParamGather>,
    /// The mesh.
    pub par: &'a Parallel,
    /// The shard layout.
    pub plan: &'a ShardPlan,
    /// Forward hooks of the ends seen (the embedding's, then the head's).
    ends_seen: usize,
}

impl<'a> Gathering<'a> {
    /// The hooks for one pass (a micro-batch's forward and backward, or an evaluation).
    pub fn new(
        gather: Option<&'a mut ParamGather>,
        par: &'a Parallel,
        plan: &'a ShardPlan,
    ) -> Self {
        Self {
            gather,
            par,
            plan,
            ends_seen: 0,
        }
    }

    fn ensure_then(&mut self, segment: Segment, next: Option<Segment>) -> Result<(), NcclError> {
        let Some(g) = self.gather.as_deref_mut() else {
            return Ok(());
        };
        g.ensure(self.par, self.plan, segment)?;
        match next {
            // `parallel.overlap: false`: every gather where it is needed, blocking.
            Some(n) if self.par.overlap => g.prefetch(self.par, self.plan, n),
            _ => Ok(()),
        }
    }

    fn layers(&self) -> usize {
        self.gather.as_ref().map_or(0, |g| g.layers)
    }
}

impl SegmentHooks for Gathering<'_> {
    fn before_forward(&mut self, segment: Segment) -> Result<(), CommError> {
        let layers = self.layers();
        let next = match segment {
            // The embedding: layer 0 next. The head: the backward starts with the last
            // layers, which are here.
            Segment::Ends => {
                self.ends_seen += 1;
                (self.ends_seen == 1 && layers > 0).then_some(Segment::Layer(0))
            }
            Segment::Layer(l) => (l + 1 < layers).then_some(Segment::Layer(l + 1)),
        };
        Ok(self.ensure_then(segment, next)?)
    }

    fn before(&mut self, segment: Segment) -> Result<(), CommError> {
        let next = match segment {
            Segment::Ends => None,
            Segment::Layer(l) => l.checked_sub(1).map(Segment::Layer),
        };
        if let Some(g) = self.gather.as_deref_mut() {
            g.restore_working(segment);
        }
        Ok(self.ensure_then(segment, next)?)
    }

    fn after(&mut self, segment: Segment) -> Result<(), CommError> {
        if let Some(g) = self.gather.as_deref_mut() {
            g.add_working_gradients(segment);
            g.progress();
        }
        Ok(())
    }
}

/// This rank's slice of `group` (fp32, `per_rank` elements on `device`): the owned part
/// of each member drawn by `values`, then zeros.
fn drawn_slice(
    group: &ShardGroup,
    values: &dyn Fn(usize, Range<usize>) -> Tensor,
    device: tch::Device,
) -> Tensor {
    let mut parts = Vec::new();
    let mut len = 0;
    for (k, &i) in group.members.iter().enumerate() {
        let r = group.layout.owned(k);
        if !r.is_empty() {
            len += r.len();
            parts.push(values(i, r).to_kind(Kind::Float));
        }
    }
    let pad = (group.layout.per_rank() - len) as i64;
    parts.push(Tensor::zeros([pad], (Kind::Float, tch::Device::Cpu)));
    Tensor::cat(&parts, 0).to_device(device)
}

/// Points every split parameter into its place in its group's buffer (its whole
/// storage is freed); a parameter with a bf16 working copy becomes a bf16 leaf there and
/// gets an fp32 stand-in. Returns those.
fn point_into_buffers(
    plan: &ShardPlan,
    params: &[(String, Tensor)],
    (buffer_of, buffers): (&[Option<usize>], &[Option<Tensor>]),
) -> Vec<Working> {
    let mut working = Vec::new();
    tch::no_grad(|| {
        for (g, group) in plan.groups().iter().enumerate() {
            let Some(key) = buffer_of[g] else { continue };
            let buffer = buffers[key]
                .as_ref()
                .expect("a buffer for every key in use");
            for (k, &i) in group.members.iter().enumerate() {
                let mut p = params[i].1.shallow_clone();
                let size = p.size();
                let place = buffer
                    .narrow(0, group.layout.start(k) as i64, p.numel() as i64)
                    .view(size.as_slice());
                p.set_data(&place);
                if group.working == Kind::BFloat16 {
                    let stand_in = Tensor::zeros([1], (Kind::Float, p.device()))
                        .expand(size.as_slice(), false)
                        .detach()
                        .set_requires_grad(true);
                    working.push(Working {
                        index: i,
                        segment: group.segment,
                        model: p,
                        stand_in,
                        freed: false,
                    });
                }
            }
        }
    });
    working
}
