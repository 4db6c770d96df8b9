//! Collectives behind one interface. Backends: `Single` (a world of one: every
//! collective is a copy-free identity) and `Mpi` (rsmpi over Open MPI, host buffers).
//!
//! Reductions are deterministic: a sum never depends on message timing or arrival order.
//! `reduce_scatter_sum` exchanges chunks with an all-to-all and sums the P contributions
//! to each chunk locally in rank order; `all_reduce_sum` is that followed by an
//! all-gather, so every rank ends with the same bits. MPI's own reduction algorithms
//! (whose order is unspecified) are used only when a communicator is made with
//! `fast_reductions` (a recipe's "fast, nondeterministic" switch).
//!
//! A communicator splits into groups (`split`), e.g. the expert-parallel group of a rank
//! and the replicas of its experts. `start_all_to_all_v` starts a nonblocking exchange
//! and returns a handle to poll and wait on, so that compute can run while it moves.

use crate::error::CommError;
use mpi::datatype::{Partition, PartitionMut};
use mpi::topology::Color;
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
impl Elem for u64 {}
impl Elem for i32 {}
impl Elem for u8 {}
impl Elem for i16 {}

/// An MPI communicator of this process (the world or a group split from it).
pub struct MpiComm {
    world: mpi::topology::SimpleCommunicator,
    rank: usize,
    size: usize,
    /// Test hook (`CATAPULT_COMM_JITTER_MS`): sleep up to this long before each
    /// collective, to perturb message timing.
    jitter_ms: u64,
    calls: std::cell::Cell<u64>,
    /// Sums with MPI's own (order-unspecified) reductions.
    fast: bool,
    /// Declared last: fields drop in order, and MPI is finalized only after every
    /// communicator that holds the universe is freed.
    universe: Arc<mpi::environment::Universe>,
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

/// A receive buffer of `len` elements, never empty: two empty Vecs share one dangling
/// address, and MPI rejects a send and receive buffer at the same address as aliased
/// (MPI_ERR_ARG). The caller uses the first `len` elements and truncates.
fn receive_buffer<T: Elem>(len: usize) -> Vec<T> {
    vec![T::default(); len.max(1)]
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
    pub fn from_env() -> Result<Comm, CommError> {
        if launched_by_mpi() {
            Comm::mpi()
        } else {
            Ok(Comm::Single)
        }
    }

    /// Initializes MPI (once per process: a second call is an error, as is a call after
    /// the first world was dropped, since MPI cannot start again once finalized).
    pub fn mpi() -> Result<Comm, CommError> {
        let universe = mpi::initialize().ok_or_else(|| CommError::MpiInit {
            problem: "MPI was already initialized in this process (it starts once, and cannot \
                      start again after it was finalized)"
                .into(),
        })?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let jitter_ms = std::env::var("CATAPULT_COMM_JITTER_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok(Comm::Mpi(MpiComm {
            world,
            rank,
            size,
            jitter_ms,
            calls: std::cell::Cell::new(0),
            fast: false,
            universe: Arc::new(universe),
        }))
    }

    /// The same communicator, summing with MPI's own reductions when `on` (faster, but
    /// the bits depend on the reduction algorithm and may differ between runs).
    pub fn fast_reductions(self, on: bool) -> Comm {
        match self {
            Comm::Single => Comm::Single,
            Comm::Mpi(m) => Comm::Mpi(MpiComm { fast: on, ..m }),
        }
    }

    /// Splits this communicator (a collective call): ranks passing the same `color` form
    /// one group, ordered by `key` then by rank here. Returns this rank's group.
    pub fn split(&self, color: usize, key: usize) -> Comm {
        match self {
            Comm::Single => Comm::Single,
            Comm::Mpi(m) => {
                m.jitter();
                let group = m
                    .world
                    .split_by_color_with_key(Color::with_value(color as i32), key as i32)
                    // rsmpi returns None only for `Color::undefined()`, and a color made
                    // from a value is always defined.
                    .expect("a defined color always gives a group");
                let (rank, size) = (group.rank() as usize, group.size() as usize);
                Comm::Mpi(MpiComm {
                    world: group,
                    rank,
                    size,
                    jitter_ms: m.jitter_ms,
                    calls: std::cell::Cell::new(0),
                    fast: m.fast,
                    universe: m.universe.clone(),
                })
            }
        }
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
                if out.is_empty() {
                    // Two empty Vecs share one dangling address, which MPI rejects as
                    // aliased buffers; there is nothing to move anyway.
                    return (out, vec![0; m.size]);
                }
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
                let total = rc.iter().sum::<i32>() as usize;
                let mut out = receive_buffer::<T>(total);
                {
                    let s = Partition::new(send, &sc[..], &sd[..]);
                    let mut r = PartitionMut::new(&mut out[..total], &rc[..], &rd[..]);
                    m.world.all_to_all_varcount_into(&s, &mut r);
                }
                out.truncate(total);
                (out, rc.iter().map(|&c| c as usize).collect())
            }
        }
    }

    /// `root`'s copy of every rank's `local`, concatenated in rank order, with each
    /// rank's count; None on the other ranks.
    pub fn gather_v<T: Elem>(&self, local: &[T], root: usize) -> Option<(Vec<T>, Vec<usize>)> {
        match self {
            Comm::Single => Some((local.to_vec(), vec![local.len()])),
            Comm::Mpi(m) => {
                m.jitter();
                let mine = local.len() as i32;
                let at = m.world.process_at_rank(root as i32);
                if m.rank != root {
                    at.gather_into(&mine);
                    at.gather_varcount_into(local);
                    return None;
                }
                let mut counts = vec![0i32; m.size];
                at.gather_into_root(&mine, &mut counts[..]);
                let displs = displacements(&counts);
                let total = counts.iter().sum::<i32>() as usize;
                let mut out = receive_buffer::<T>(total);
                {
                    let mut recv = PartitionMut::new(&mut out[..total], &counts[..], &displs[..]);
                    at.gather_varcount_into_root(local, &mut recv);
                }
                out.truncate(total);
                Some((out, counts.iter().map(|&c| c as usize).collect()))
            }
        }
    }

    /// Starts sending `send_counts[d]` consecutive elements of `send` to rank d, expecting
    /// `recv_counts[s]` from rank s (known beforehand, e.g. from a blocking exchange of
    /// counts). The returned handle owns both buffers; `wait` gives what arrived.
    pub fn start_all_to_all_v<T: Elem>(
        &self,
        send: Vec<T>,
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Pending<T> {
        assert_eq!(send_counts.len(), self.size(), "one send count per rank");
        assert_eq!(recv_counts.len(), self.size(), "one receive count per rank");
        assert_eq!(
            send_counts.iter().sum::<usize>(),
            send.len(),
            "send counts cover the buffer"
        );
        match self {
            Comm::Single => Pending {
                state: PendingState::Done(send, recv_counts.to_vec()),
            },
            Comm::Mpi(m) => {
                m.jitter();
                let sc: Vec<i32> = send_counts.iter().map(|&c| c as i32).collect();
                let rc: Vec<i32> = recv_counts.iter().map(|&c| c as i32).collect();
                let (sd, rd) = (displacements(&sc), displacements(&rc));
                let mut recv = receive_buffer::<T>(rc.iter().sum::<i32>() as usize);
                let datatype = T::equivalent_datatype();
                let mut request = std::mem::MaybeUninit::<mpi::ffi::MPI_Request>::uninit();
                // SAFETY: every buffer is a heap allocation owned by the handle, which
                // waits for the request before they are freed (in `wait` or on drop);
                // moving a Vec does not move its elements.
                let request = unsafe {
                    mpi::ffi::MPI_Ialltoallv(
                        send.as_ptr() as *const std::ffi::c_void,
                        sc.as_ptr(),
                        sd.as_ptr(),
                        datatype.as_raw(),
                        recv.as_mut_ptr() as *mut std::ffi::c_void,
                        rc.as_ptr(),
                        rd.as_ptr(),
                        datatype.as_raw(),
                        m.world.as_raw(),
                        request.as_mut_ptr(),
                    );
                    request.assume_init()
                };
                Pending::started(
                    request,
                    (send, recv),
                    [sc, sd, rc, rd],
                    recv_counts.to_vec(),
                )
            }
        }
    }

    /// Starts gathering every rank's `send` (the same length on each) onto every rank:
    /// `wait` gives them concatenated in rank order.
    pub fn start_all_gather<T: Elem>(&self, send: Vec<T>) -> Pending<T> {
        let n = send.len();
        match self {
            Comm::Single => Pending {
                state: PendingState::Done(send, vec![n]),
            },
            Comm::Mpi(m) => {
                m.jitter();
                let mut recv = receive_buffer::<T>(n * m.size);
                let datatype = T::equivalent_datatype();
                let mut request = std::mem::MaybeUninit::<mpi::ffi::MPI_Request>::uninit();
                // SAFETY: as in `start_all_to_all_v`: the handle owns both buffers and
                // completes the request before freeing them.
                let request = unsafe {
                    mpi::ffi::MPI_Iallgather(
                        send.as_ptr() as *const std::ffi::c_void,
                        n as i32,
                        datatype.as_raw(),
                        recv.as_mut_ptr() as *mut std::ffi::c_void,
                        n as i32,
                        datatype.as_raw(),
                        m.world.as_raw(),
                        request.as_mut_ptr(),
                    );
                    request.assume_init()
                };
                Pending::started(request, (send, recv), Default::default(), vec![n; m.size])
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
        if let Comm::Mpi(m) = self {
            if m.fast {
                m.jitter();
                let send = data.to_vec();
                m.world
                    .all_reduce_into(&send[..], data, mpi::collective::SystemOperation::sum());
                return;
            }
        }
        let chunk = self.reduce_scatter_sum(data);
        let (all, _) = self.all_gather_v(&chunk);
        data.copy_from_slice(&all);
    }
}

/// A nonblocking all-to-all (or all-gather) in flight.
pub struct Pending<T: Elem> {
    state: PendingState<T>,
}

enum PendingState<T: Elem> {
    Done(Vec<T>, Vec<usize>),
    Mpi(Box<MpiPending<T>>),
    Taken,
}

struct MpiPending<T> {
    request: mpi::ffi::MPI_Request,
    done: bool,
    _send: Vec<T>,
    recv: Vec<T>,
    /// Send counts and displacements, receive counts and displacements: MPI may read
    /// them until the request completes.
    _counts: [Vec<i32>; 4],
    recv_counts: Vec<usize>,
}

impl<T> MpiPending<T> {
    fn complete(&mut self) {
        if !self.done {
            // SAFETY: the request was started by MPI_Ialltoallv and not yet completed.
            unsafe {
                mpi::ffi::MPI_Wait(&mut self.request, mpi::ffi::RSMPI_STATUS_IGNORE);
            }
            self.done = true;
        }
    }
}

impl<T: Elem> Pending<T> {
    /// A handle on a started MPI request that owns its buffers (`send`, `recv`) and the
    /// count arrays MPI may read until it completes.
    fn started(
        request: mpi::ffi::MPI_Request,
        (send, recv): (Vec<T>, Vec<T>),
        counts: [Vec<i32>; 4],
        recv_counts: Vec<usize>,
    ) -> Self {
        Pending {
            state: PendingState::Mpi(Box::new(MpiPending {
                request,
                done: false,
                _send: send,
                recv,
                _counts: counts,
                recv_counts,
            })),
        }
    }

    /// Lets MPI progress the exchange (Open MPI moves nonblocking collectives forward
    /// only inside MPI calls); true once it has completed.
    pub fn test(&mut self) -> bool {
        match &mut self.state {
            PendingState::Mpi(p) if !p.done => {
                let mut flag = 0;
                // SAFETY: as in `complete`; MPI_Test frees the request when it completes.
                unsafe {
                    mpi::ffi::MPI_Test(&mut p.request, &mut flag, mpi::ffi::RSMPI_STATUS_IGNORE);
                }
                p.done = flag != 0;
                p.done
            }
            _ => true,
        }
    }

    /// Waits for the exchange; returns what arrived, in source-rank order, and how many
    /// elements came from each rank.
    pub fn wait(mut self) -> (Vec<T>, Vec<usize>) {
        match std::mem::replace(&mut self.state, PendingState::Taken) {
            PendingState::Done(v, c) => (v, c),
            PendingState::Mpi(mut p) => {
                p.complete();
                let total = p.recv_counts.iter().sum();
                let mut recv = std::mem::take(&mut p.recv);
                recv.truncate(total);
                (recv, std::mem::take(&mut p.recv_counts))
            }
            PendingState::Taken => unreachable!("a handle is waited on once"),
        }
    }
}

impl<T: Elem> Drop for Pending<T> {
    fn drop(&mut self) {
        if let PendingState::Mpi(p) = &mut self.state {
            // Never free buffers MPI may still write to.
            p.complete();
        }
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
        assert_eq!(c.gather_v(&x, 0), Some((x.clone(), vec![3])));
        let mut h = c.start_all_to_all_v(x.clone(), &[3], &[3]);
        assert!(h.test());
        assert_eq!(h.wait(), (x.clone(), vec![3]));
        assert_eq!(c.start_all_gather(x.clone()).wait(), (x.clone(), vec![3]));
        assert_eq!(c.split(5, 0).size(), 1);
        assert_eq!(bounds(10, 4, 3), 7..10);
        assert_eq!(displacements(&[2, 0, 3]), vec![0, 2, 2]);
    }
}
