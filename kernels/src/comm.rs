//! Collectives behind one interface. Backends: `Single` (a world of one: every
//! collective is a copy-free identity) and `Mpi` (rsmpi over Open MPI, host buffers).
//!
//! Reductions are deterministic: a sum never depends on message timing or arrival order.
//! `reduce_scatter_sum` exchanges chunks with an all-to-all and sums the P contributions
//! to each chunk locally in rank order; `all_reduce_sum` is that followed by an
//! all-gather, so every rank ends with the same bits. MPI's own reduction algorithms
//! (whose order is unspecified) are never used.

use mpi::datatype::{Partition, PartitionMut};
use mpi::traits::*;
use std::sync::Arc;

/// Element types the collectives move and sum.
pub trait Elem:
    Copy + Default + Send + Sync + 'static + Equivalence + std::ops::Add<Output = Self>
{
}
impl Elem for f32 {}
impl Elem for f64 {}
impl Elem for i64 {}
impl Elem for i32 {}
impl Elem for u8 {}

/// The MPI world of this process.
pub struct MpiComm {
    _universe: Arc<mpi::environment::Universe>,
    world: mpi::topology::SimpleCommunicator,
    rank: usize,
    size: usize,
    /// Test hook (`CATAPULT_COMM_JITTER_MS`): sleep up to this long before each
    /// collective, to perturb message timing.
    jitter_ms: u64,
    calls: std::cell::Cell<u64>,
}

impl MpiComm {
    fn jitter(&self) {
        if self.jitter_ms == 0 {
            return;
        }
        let n = self.calls.get();
        self.calls.set(n + 1);
        let mut x = (self.rank as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ n.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 31;
        x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 29;
        std::thread::sleep(std::time::Duration::from_micros(
            x % (self.jitter_ms * 1000),
        ));
    }
}

/// A communicator: which ranks exist and how data moves between them.
pub enum Comm {
    /// A world of one process.
    Single,
    /// Open MPI ranks.
    Mpi(MpiComm),
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Comm({} of {}, {})",
            self.rank(),
            self.size(),
            self.backend()
        )
    }
}

/// Whether this process was started by an MPI launcher (mpirun, or srun --mpi=pmix).
pub fn launched_by_mpi() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

fn bounds(len: usize, parts: usize, i: usize) -> std::ops::Range<usize> {
    len * i / parts..len * (i + 1) / parts
}

fn displacements(counts: &[i32]) -> Vec<i32> {
    counts
        .iter()
        .scan(0, |acc, &c| {
            let d = *acc;
            *acc += c;
            Some(d)
        })
        .collect()
}

impl Comm {
    /// MPI when started by an MPI launcher, else a world of one.
    pub fn from_env() -> Comm {
        if launched_by_mpi() {
            Comm::mpi()
        } else {
            Comm::Single
        }
    }

    /// Initializes MPI (once per process).
    pub fn mpi() -> Comm {
        let universe = mpi::initialize().expect("MPI initializes once per process");
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let jitter_ms = std::env::var("CATAPULT_COMM_JITTER_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Comm::Mpi(MpiComm {
            _universe: Arc::new(universe),
            world,
            rank,
            size,
            jitter_ms,
            calls: std::cell::Cell::new(0),
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        match self {
            Comm::Single => 0,
            Comm::Mpi(m) => m.rank,
        }
    }

    /// Ranks in the world.
    pub fn size(&self) -> usize {
        match self {
            Comm::Single => 1,
            Comm::Mpi(m) => m.size,
        }
    }

    /// `single` or `mpi`.
    pub fn backend(&self) -> &'static str {
        match self {
            Comm::Single => "single",
            Comm::Mpi(_) => "mpi",
        }
    }

    /// Waits until every rank arrives.
    pub fn barrier(&self) {
        if let Comm::Mpi(m) = self {
            m.jitter();
            m.world.barrier();
        }
    }

    /// Copies `root`'s `data` to every rank.
    pub fn broadcast<T: Elem>(&self, data: &mut [T], root: usize) {
        if let Comm::Mpi(m) = self {
            m.jitter();
            m.world.process_at_rank(root as i32).broadcast_into(data);
        }
    }

    /// Every rank's `local`, concatenated in rank order, and each rank's count.
    pub fn all_gather_v<T: Elem>(&self, local: &[T]) -> (Vec<T>, Vec<usize>) {
        match self {
            Comm::Single => (local.to_vec(), vec![local.len()]),
            Comm::Mpi(m) => {
                m.jitter();
                let mine = local.len() as i32;
                let mut counts = vec![0i32; m.size];
                m.world.all_gather_into(&mine, &mut counts[..]);
                let displs = displacements(&counts);
                let mut out = vec![T::default(); counts.iter().sum::<i32>() as usize];
                {
                    let mut recv = PartitionMut::new(&mut out[..], &counts[..], &displs[..]);
                    m.world.all_gather_varcount_into(local, &mut recv);
                }
                (out, counts.iter().map(|&c| c as usize).collect())
            }
        }
    }

    /// Sends `send_counts[d]` consecutive elements of `send` to rank d; returns what
    /// arrived, in source-rank order, and how many came from each rank.
    pub fn all_to_all_v<T: Elem>(&self, send: &[T], send_counts: &[usize]) -> (Vec<T>, Vec<usize>) {
        assert_eq!(send_counts.len(), self.size(), "one send count per rank");
        assert_eq!(
            send_counts.iter().sum::<usize>(),
            send.len(),
            "send counts cover the buffer"
        );
        match self {
            Comm::Single => (send.to_vec(), send_counts.to_vec()),
            Comm::Mpi(m) => {
                m.jitter();
                let sc: Vec<i32> = send_counts.iter().map(|&c| c as i32).collect();
                let mut rc = vec![0i32; m.size];
                m.world.all_to_all_into(&sc[..], &mut rc[..]);
                let (sd, rd) = (displacements(&sc), displacements(&rc));
                let mut out = vec![T::default(); rc.iter().sum::<i32>() as usize];
                {
                    let s = Partition::new(send, &sc[..], &sd[..]);
                    let mut r = PartitionMut::new(&mut out[..], &rc[..], &rd[..]);
                    m.world.all_to_all_varcount_into(&s, &mut r);
                }
                (out, rc.iter().map(|&c| c as usize).collect())
            }
        }
    }

    /// Sums `data` over ranks and returns this rank's chunk of the sum (chunk r covers
    /// `len * r / P .. len * (r + 1) / P`), adding contributions in rank order.
    pub fn reduce_scatter_sum<T: Elem>(&self, data: &[T]) -> Vec<T> {
        let p = self.size();
        if p == 1 {
            return data.to_vec();
        }
        let counts: Vec<usize> = (0..p).map(|r| bounds(data.len(), p, r).len()).collect();
        let (pieces, _) = self.all_to_all_v(data, &counts);
        let mine = counts[self.rank()];
        let mut acc = pieces[..mine].to_vec();
        for src in 1..p {
            for (a, &x) in acc.iter_mut().zip(&pieces[src * mine..(src + 1) * mine]) {
                *a = *a + x;
            }
        }
        acc
    }

    /// Replaces `data` with its sum over ranks, the same bits on every rank.
    pub fn all_reduce_sum<T: Elem>(&self, data: &mut [T]) {
        if self.size() == 1 {
            return;
        }
        let chunk = self.reduce_scatter_sum(data);
        let (all, _) = self.all_gather_v(&chunk);
        data.copy_from_slice(&all);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_world_of_one_is_the_identity() {
        let c = Comm::Single;
        let mut x = vec![1.5f32, -2.0, 3.25];
        c.all_reduce_sum(&mut x);
        assert_eq!(x, vec![1.5, -2.0, 3.25]);
        assert_eq!(c.all_to_all_v(&x, &[3]).0, x);
        assert_eq!(c.all_gather_v(&x), (x.clone(), vec![3]));
        assert_eq!(c.reduce_scatter_sum(&x), x);
        assert_eq!(bounds(10, 4, 3), 7..10);
        assert_eq!(displacements(&[2, 0, 3]), vec![0, 2, 2]);
    }
}
