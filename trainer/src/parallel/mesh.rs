//! The mesh's layout: world = data x expert parallel, each group of ranks with its host
//! communicator and optional NCCL twin, which tensors the expert group splits, and
//! which segment of the model (a layer, or the ends) a tensor belongs to.

use catapult_kernels::comm::Comm;
use catapult_kernels::nccl::NcclComm;
use catapult_kernels::NcclError;
use std::ops::Range;

/// Errors of laying out the mesh; each says what to change.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The expert-parallel size does not divide the world.
    #[error(
        "parallel.expert = {expert} does not divide the world of {world} rank(s); start a \
         multiple of {expert} ranks (mpirun -np {expert} catapult train ...) or set \
         parallel.expert to a divisor of {world}"
    )]
    ExpertSplit {
        /// The recipe's expert-parallel size.
        expert: usize,
        /// Ranks in the world.
        world: usize,
    },
    /// data x expert is not the world.
    #[error(
        "parallel.data = {data} x parallel.expert = {expert} = {want} ranks, but the world \
         has {world}; start {want} ranks or set parallel.data to {auto} (or 0 for auto)"
    )]
    DataSplit {
        /// The recipe's data-parallel size.
        data: usize,
        /// The recipe's expert-parallel size.
        expert: usize,
        /// data x expert.
        want: usize,
        /// Ranks in the world.
        world: usize,
        /// What `data` should be.
        auto: usize,
    },
    /// Sharding asked for where there is no second rank to split over.
    #[error(
        "parallel.shard = {mode} splits state over the ranks that replicate it, but the world \
         has 1 rank; start more ranks (mpirun -np N catapult train ...) or set parallel.shard \
         to none"
    )]
    ShardAlone {
        /// The recipe's shard mode.
        mode: String,
    },
    /// An NCCL communicator could not be created.
    #[error(transparent)]
    Nccl(#[from] NcclError),
}

/// One group of ranks of the mesh: its host communicator and, with the NCCL backend, an
/// NCCL communicator over the same ranks (CUDA tensors move GPU to GPU). A group reads
/// as its host communicator (`group.rank()`, `group.all_reduce_sum(..)`).
pub struct Group {
    comm: Comm,
    nccl: Option<NcclComm>,
}

impl Group {
    /// A group over `comm`, with an NCCL twin on `device` when given.
    fn new(comm: Comm, device: Option<tch::Device>) -> Result<Self, LayoutError> {
        let nccl = match device {
            None => None,
            Some(d) => Some(NcclComm::new(&comm, d)?),
        };
        Ok(Self { comm, nccl })
    }

    /// The NCCL communicator over this group's ranks, if the backend is NCCL.
    pub fn nccl(&self) -> Option<&NcclComm> {
        self.nccl.as_ref()
    }

    /// The host communicator.
    pub fn comm(&self) -> &Comm {
        &self.comm
    }
}

impl std::ops::Deref for Group {
    type Target = Comm;
    fn deref(&self) -> &Comm {
        &self.comm
    }
}

/// How the world is split: world = data x expert. Rank r is expert-parallel rank
/// r % expert of data-parallel replica r / expert.
pub struct Parallel {
    /// Every rank.
    pub world: Group,
    /// The ranks that split the experts between them (one replica).
    pub expert: Group,
    /// The ranks that hold the same experts (one per replica).
    pub replicas: Group,
    /// Expert-parallel size.
    pub expert_size: usize,
    /// Data-parallel size (replicas of each expert).
    pub data_size: usize,
    /// Overlap the all-to-alls with the dense compute.
    pub overlap: bool,
}

impl std::fmt::Debug for Parallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Parallel(rank {} of {}: data {} x expert {})",
            self.world.rank(),
            self.world.size(),
            self.data_size,
            self.expert_size
        )
    }
}

impl Parallel {
    /// Splits `world` into expert groups of `expert` ranks. `data` is the requested
    /// data-parallel size (0: whatever the world leaves). Errors say what to change.
    pub fn new(
        world: Comm,
        expert: usize,
        data: usize,
        overlap: bool,
    ) -> Result<Self, LayoutError> {
        Self::with_nccl(world, expert, data, overlap, None)
    }

    /// `new`, with NCCL communicators over every group on the GPU `nccl` names.
    pub fn with_nccl(
        world: Comm,
        expert: usize,
        data: usize,
        overlap: bool,
        nccl: Option<tch::Device>,
    ) -> Result<Self, LayoutError> {
        let p = world.size();
        if expert == 0 || !p.is_multiple_of(expert) {
            return Err(LayoutError::ExpertSplit { expert, world: p });
        }
        if data != 0 && data * expert != p {
            return Err(LayoutError::DataSplit {
                data,
                expert,
                want: data * expert,
                world: p,
                auto: p / expert,
            });
        }
        let r = world.rank();
        let group = world.split(r / expert, r % expert);
        let replicas = world.split(r % expert, r / expert);
        Ok(Self {
            world: Group::new(world, nccl)?,
            expert: Group::new(group, nccl)?,
            replicas: Group::new(replicas, nccl)?,
            expert_size: expert,
            data_size: p / expert,
            overlap,
        })
    }

    /// A world of one.
    pub fn single() -> Self {
        let one = || Group {
            comm: Comm::Single,
            nccl: None,
        };
        Self {
            world: one(),
            expert: one(),
            replicas: one(),
            expert_size: 1,
            data_size: 1,
            overlap: false,
        }
    }

    /// The routed experts (of `n`) this rank holds.
    pub fn local_experts(&self, n: usize) -> Range<usize> {
        let per = n / self.expert_size;
        let e = self.expert.rank();
        e * per..(e + 1) * per
    }
}

/// Whether a tensor belongs to a routed expert (a parameter, or its optimizer moment):
/// split over the expert-parallel ranks, replicated over the data-parallel replicas.
/// The one definition: parameter groups, reductions and checkpoints all ask it.
pub fn is_expert_param(name: &str) -> bool {
    name.contains(".mlp.experts.")
}

/// A part of the model whose parameters are used (and whose gradients are complete) at
/// one point of a pass: a decoder layer, or the ends (embedding, head, final norm, MTP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Segment {
    /// Decoder layer l (`model.layers.l.*`).
    Layer(usize),
    /// Everything else.
    Ends,
}

impl Segment {
    /// The segment a parameter belongs to, from its name.
    pub fn of(name: &str) -> Segment {
        name.strip_prefix("model.layers.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|l| l.parse().ok())
            .map_or(Segment::Ends, Segment::Layer)
    }

    /// How many decoder layers `segments` reach (one past the highest layer index).
    pub fn layer_count(segments: impl IntoIterator<Item = Segment>) -> usize {
        segments
            .into_iter()
            .filter_map(|s| match s {
                Segment::Layer(l) => Some(l + 1),
                Segment::Ends => None,
            })
            .max()
            .unwrap_or(0)
    }
}
