//! Expert-parallel token exchange for one MoE layer. Routed experts are split evenly and
//! contiguously over the ranks of an expert-parallel group. After routing, each rank's
//! FFN-expert rows, already grouped by expert (so by owner), are sent to their owners
//! (dispatch); an owner regroups what arrived by local expert, computes, restores the
//! arrival order and sends the rows back (combine). Zero-computation experts never leave
//! their rank: their slots are not in the exchange at all.
//!
//! The row order is fixed by (owner, expert, slot) on the sender and (expert, source,
//! slot) on the owner, so nothing depends on message timing. Gradients travel the same
//! plan in the opposite direction (`Direction::Back`).

use crate::comm::{Comm, Pending};
use crate::error::CommError;
use crate::moe::ExpertDispatch;
use crate::nccl::NcclComm;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// The rank that owns `expert` of `n_experts` over `ranks` ranks (`ranks` divides
/// `n_experts`, as `Plan::new` checks).
pub fn owner(expert: usize, n_experts: usize, ranks: usize) -> usize {
    expert / (n_experts / ranks)
}

/// Time and volume spent in exchanges, summed.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ExchangeStats {
    /// Exchanges started.
    pub exchanges: u64,
    /// Bytes this rank handed to the all-to-all (rows kept on this rank included).
    pub bytes: u64,
    /// Bytes sent to other ranks.
    pub bytes_remote: u64,
    /// Seconds spent inside the exchange calls (staging, starting and waiting): the
    /// communication time compute did not hide.
    pub exposed_s: f64,
}

impl ExchangeStats {
    /// Adds `other` to these.
    pub fn add(&mut self, other: &ExchangeStats) {
        self.exchanges += other.exchanges;
        self.bytes += other.bytes;
        self.bytes_remote += other.bytes_remote;
        self.exposed_s += other.exposed_s;
    }
}

/// Which way rows move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Senders to owners: the dispatch, and the combine's gradient.
    ToOwners,
    /// Owners to senders: the combine, and the dispatch's gradient.
    Back,
}

/// Who sends how many rows to whom in one layer's exchange, and how an owner regroups
/// the rows it receives by expert.
#[derive(Debug)]
pub struct Plan {
    /// Rows this rank sends to each rank (its FFN-expert slots).
    pub send_rows: Vec<usize>,
    /// Rows arriving from each rank.
    pub recv_rows: Vec<usize>,
    /// Rows per local expert, summed over the sources.
    pub local_counts: Vec<i64>,
    /// Received rows (source-major) in expert-major order.
    to_expert_major: Tensor,
    /// The inverse of `to_expert_major`.
    to_source_major: Tensor,
}

impl Plan {
    /// The plan for `dispatch` (this rank's routing over all N FFN experts) in the
    /// expert-parallel group `comm`: exchanges the per-expert row counts (a small
    /// blocking all-to-all). An error when the experts do not split evenly over the
    /// group, or when a peer's counts do not fit (the ranks disagree on the model).
    pub fn new(comm: &Comm, dispatch: &ExpertDispatch, device: Device) -> Result<Plan, CommError> {
        let p = comm.size();
        let n = dispatch.counts.len();
        if !n.is_multiple_of(p) {
            return Err(CommError::ExpertSplit {
                rank: comm.rank(),
                experts: n,
                ranks: p,
            });
        }
        let e = n / p;
        let send_rows: Vec<usize> = (0..p)
            .map(|d| dispatch.counts[d * e..(d + 1) * e].iter().sum::<i64>() as usize)
            .collect();
        let (c, _) = comm.all_to_all_v(&dispatch.counts, &vec![e; p]);
        if c.len() != p * e || c.iter().any(|&x| x < 0) {
            return Err(CommError::Exchange {
                rank: comm.rank(),
                problem: format!(
                    "the group sent {} expert row counts (expected {p} ranks x {e} experts, none \
                     negative): the ranks disagree on the number of experts; start every rank \
                     with the same recipe",
                    c.len()
                ),
            });
        }
        let recv_rows: Vec<usize> = (0..p)
            .map(|s| c[s * e..(s + 1) * e].iter().sum::<i64>() as usize)
            .collect();
        let local_counts: Vec<i64> = (0..e).map(|j| (0..p).map(|s| c[s * e + j]).sum()).collect();
        // Row of (source s, local expert j)'s first row in the source-major buffer.
        let mut order = Vec::with_capacity(recv_rows.iter().sum());
        for j in 0..e {
            let mut source_start = 0i64;
            for s in 0..p {
                let within: i64 = c[s * e..s * e + j].iter().sum();
                let start = source_start + within;
                order.extend(start..start + c[s * e + j]);
                source_start += recv_rows[s] as i64;
            }
        }
        let to_expert_major = Tensor::from_slice(&order).to_device(device);
        let to_source_major = to_expert_major.argsort(0, false);
        Ok(Plan {
            send_rows,
            recv_rows,
            local_counts,
            to_expert_major,
            to_source_major,
        })
    }

    /// Received (source-major) rows regrouped by local expert: a permutation, so its
    /// backward writes every row once.
    pub fn expert_major(&self, rows: &Tensor) -> Tensor {
        rows.index_select(0, &self.to_expert_major)
    }

    /// Expert-major rows back in arrival order, ready to be sent back.
    pub fn source_major(&self, rows: &Tensor) -> Tensor {
        rows.index_select(0, &self.to_source_major)
    }

    /// The hidden size of rows of `shape` to `send` over `comm`: an error unless they are
    /// rows x hidden, as many rows as the plan sends, over a group of the plan's size.
    fn check_rows(&self, comm: &Comm, send: &[usize], shape: &[i64]) -> Result<i64, CommError> {
        let planned: usize = send.iter().sum();
        let problem = match shape {
            _ if send.len() != comm.size() => format!(
                "the plan was made for a group of {} ranks, not this one of {}",
                send.len(),
                comm.size()
            ),
            [n, _] if usize::try_from(*n).ok() != Some(planned) => {
                format!("{n} rows to send, but the plan sends {planned}")
            }
            [_, hidden] => return Ok(*hidden),
            _ => format!("rows must be rows x hidden, not of shape {shape:?}"),
        };
        Err(CommError::Exchange {
            rank: comm.rank(),
            problem,
        })
    }

    /// Starts moving `rows` (this rank's rows for `direction`, in order) over `comm`, or
    /// over `nccl` (the same ranks, GPU to GPU) when given. The result arrives as a new
    /// leaf tensor (its gradient is what moves back): see `InFlight`. An error when
    /// `rows` do not fit the plan or `comm`, or when an NCCL call fails.
    pub fn start(
        &self,
        comm: &Comm,
        nccl: Option<&NcclComm>,
        rows: &Tensor,
        direction: Direction,
    ) -> Result<InFlight, CommError> {
        let begun = Instant::now();
        let (send, recv) = match direction {
            Direction::ToOwners => (&self.send_rows, &self.recv_rows),
            Direction::Back => (&self.recv_rows, &self.send_rows),
        };
        let (kind, device) = (rows.kind(), rows.device());
        let hidden = self.check_rows(comm, send, &rows.size())?;
        let mut stats = ExchangeStats {
            exchanges: 1,
            bytes: (rows.numel() * 4) as u64,
            bytes_remote: ((send.iter().sum::<usize>() - send[comm.rank()]) as u64)
                * hidden as u64
                * 4,
            exposed_s: 0.0,
        };
        let state = if comm.size() == 1 {
            // A world of one: no copies, the same storage becomes the far side's leaf.
            Flight::Local(rows.detach())
        } else if let Some(nccl) = nccl {
            // Enqueued on the compute stream: ordered with what uses the result.
            Flight::Local(nccl.all_to_all_rows(&rows.detach(), send, recv)?)
        } else {
            let host: Vec<f32> = Vec::try_from(
                &rows
                    .detach()
                    .to_kind(Kind::Float)
                    .to_device(Device::Cpu)
                    .reshape([-1]),
            )
            // A contiguous float tensor on the CPU always converts.
            .expect("rows converted to f32 on the CPU");
            let h = hidden as usize;
            let sc: Vec<usize> = send.iter().map(|r| r * h).collect();
            let rc: Vec<usize> = recv.iter().map(|r| r * h).collect();
            Flight::Mpi(comm.start_all_to_all_v(host, &sc, &rc))
        };
        stats.exposed_s = begun.elapsed().as_secs_f64();
        Ok(InFlight {
            state,
            rows: recv.iter().sum::<usize>() as i64,
            hidden,
            kind,
            device,
            rank: comm.rank(),
            stats,
        })
    }
}

enum Flight {
    Local(Tensor),
    Mpi(Pending<f32>),
}

/// An exchange in flight.
pub struct InFlight {
    state: Flight,
    rows: i64,
    hidden: i64,
    kind: Kind,
    device: Device,
    /// This rank in the group, for messages.
    rank: usize,
    stats: ExchangeStats,
}

impl InFlight {
    /// Lets the exchange progress (call between pieces of compute).
    pub fn poll(&mut self) {
        if let Flight::Mpi(p) = &mut self.state {
            let begun = Instant::now();
            p.test();
            self.stats.exposed_s += begun.elapsed().as_secs_f64();
        }
    }

    /// Waits for the rows: rows x hidden, in the sender's kind and device, a leaf that
    /// requires a gradient when `requires_grad`. Adds the exchange's cost to `stats`.
    /// An error when what arrived does not have the planned rows.
    pub fn wait(self, requires_grad: bool, stats: &mut ExchangeStats) -> Result<Tensor, CommError> {
        let begun = Instant::now();
        let t = match self.state {
            Flight::Local(t) => t,
            Flight::Mpi(p) => {
                let (data, _) = p.wait();
                let len = data.len();
                Tensor::from_slice(&data)
                    .f_view([self.rows, self.hidden])
                    .map_err(|e| CommError::Exchange {
                        rank: self.rank,
                        problem: format!(
                            "{len} values arrived for {} rows of {} ({e})",
                            self.rows, self.hidden
                        ),
                    })?
                    .to_device(self.device)
                    .to_kind(self.kind)
            }
        };
        let mut s = self.stats;
        s.exposed_s += begun.elapsed().as_secs_f64();
        stats.add(&s);
        Ok(if requires_grad {
            t.set_requires_grad(true)
        } else {
            t
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_rank_plan_regroups_nothing_and_moves_nothing() {
        let comm = Comm::Single;
        let idx = Tensor::from_slice(&[3i64, 1, 0, 5, 2, 2, 1, 3, 4, 0]).view([5, 2]);
        let d = ExpertDispatch::new(&idx, 4, 6);
        let plan = Plan::new(&comm, &d, Device::Cpu).unwrap();
        assert_eq!(plan.send_rows, vec![8]);
        assert_eq!(plan.recv_rows, vec![8]);
        assert_eq!(plan.local_counts, vec![2, 2, 2, 2]);
        let x = Tensor::arange(15, (Kind::Float, Device::Cpu)).view([5, 3]);
        let rows = d.gather(&x);
        let mut stats = ExchangeStats::default();
        let there = plan
            .start(&comm, None, &rows, Direction::ToOwners)
            .unwrap()
            .wait(true, &mut stats)
            .unwrap();
        assert!(there.requires_grad() && there.is_leaf());
        assert_eq!(plan.expert_major(&there), rows);
        let back = plan
            .start(&comm, None, &plan.source_major(&there), Direction::Back)
            .unwrap()
            .wait(false, &mut stats)
            .unwrap();
        assert_eq!(back, rows);
        assert_eq!(stats.exchanges, 2);
        assert_eq!(stats.bytes_remote, 0);
        assert_eq!(owner(5, 8, 2), 1);
        // Rows that do not fit the plan are an error, not a panic.
        let err = plan
            .start(&comm, None, &rows.narrow(0, 0, 3), Direction::ToOwners)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("3 rows to send, but the plan sends 8"),
            "{err}"
        );
    }
}
