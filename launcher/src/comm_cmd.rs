//! `catapult comm check`: the collectives' conformance checks, run in whatever world this
//! process is in (`mpirun -np P catapult comm check`, or alone). Each rank prints one JSON
//! line; the exit code is 1 if any check failed.

use catapult_kernels::comm::Comm;
use catapult_kernels::ep::{owner, Direction, ExchangeStats, Plan};
use catapult_kernels::moe::{ffn_choice_mask, ExpertDispatch};
use catapult_kernels::CommError;
use catapult_trainer::parallel::{forward, is_expert_param, NoHooks, Parallel, Training};
use catapult_trainer::recipe::ModelConfig;
use clap::Subcommand;
use tch::{Device, Kind, Tensor};

#[derive(Subcommand)]
pub enum CommCommand {
    /// Check every collective against values each rank can compute itself.
    Check {
        /// Sleep up to this many milliseconds at random points (seeded by rank) to perturb
        /// message timing; reductions must give the same bits anyway.
        #[arg(long, default_value_t = 0)]
        jitter_ms: u64,
        /// `mpi` (host buffers; `single` alone) or `nccl` (CUDA tensors, one GPU per rank;
        /// prints a `skipped` line and succeeds where there is no GPU or no NCCL).
        #[arg(long, default_value = "mpi")]
        backend: String,
    },
}

fn value(rank: usize, i: usize) -> f32 {
    // Mixed magnitudes, so that the summation order shows in the low bits.
    let sign = if (rank + i).is_multiple_of(3) {
        -1.0
    } else {
        1.0
    };
    sign * (1.0 + i as f32 * 0.37) * 10f32.powi(((rank * 7 + i) % 9) as i32 - 4)
}

pub fn run(command: CommCommand) -> Result<(), crate::Failure> {
    let CommCommand::Check { jitter_ms, backend } = command;
    match backend.as_str() {
        "mpi" | "single" => {}
        "nccl" => return nccl_check(),
        other => {
            return Err(anyhow::anyhow!("--backend {other}: use mpi (or single) or nccl").into())
        }
    }
    let comm = Comm::from_env()?;
    let (r, p) = (comm.rank(), comm.size());
    let mut c = Checks::new(r, jitter_ms);
    exchange_checks(&comm, &mut c);
    let digest = sum_checks(&comm, &mut c);
    nonblocking_and_group_checks(&comm, &mut c);
    // Expert parallelism in every layout of this world (each expert-parallel size that
    // divides it): the exchange is the identity with identity experts, and a model's
    // gradients equal one process's on the whole batch.
    for ep in (1..=p).filter(|e| p.is_multiple_of(*e)) {
        c.jitter();
        let par = Parallel::new(comm.split(0, r), ep, 0, true).map_err(|e| anyhow::anyhow!(e))?;
        match ep_identity_check(&par) {
            Ok(ok) => c.check(&format!("ep{ep}_identity"), ok),
            Err(problem) => {
                catapult_data::log_line!("rank {r}: ep{ep}_identity: {problem}");
                c.check(&format!("ep{ep}_identity"), false);
            }
        }
        if let Err(problem) = ep_gradient_check(&par) {
            catapult_data::log_line!("rank {r}: ep{ep}_gradients: {problem}");
            c.check(&format!("ep{ep}_gradients"), false);
        }
    }

    c.jitter();
    comm.barrier();

    println!(
        "{}",
        serde_json::json!({
            "rank": r,
            "size": p,
            "backend": comm.backend(),
            "failures": c.failures,
            "digest": digest,
        })
    );
    if c.failures.is_empty() {
        Ok(())
    } else {
        Err(anyhow::anyhow!("rank {r}: collectives failed: {}", c.failures.join(", ")).into())
    }
}

/// The checks' failures so far, and the timing perturbation between them.
struct Checks {
    failures: Vec<String>,
    jitter_ms: u64,
    rng: u64,
}

impl Checks {
    fn new(rank: usize, jitter_ms: u64) -> Self {
        Self {
            failures: Vec::new(),
            jitter_ms,
            rng: 0x9E37_79B9_7F4A_7C15u64 ^ (rank as u64 + 1),
        }
    }

    /// Sleeps up to `jitter_ms` (seeded by rank), to perturb message timing.
    fn jitter(&mut self) {
        if self.jitter_ms > 0 {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            std::thread::sleep(std::time::Duration::from_micros(
                self.rng % (self.jitter_ms * 1000),
            ));
        }
    }

    /// Records `name` as failed unless `ok`.
    fn check(&mut self, name: &str, ok: bool) {
        if !ok {
            self.failures.push(name.to_string());
        }
    }
}

/// The blocking exchanges: all-to-all and all-gather with variable counts, broadcast.
fn exchange_checks(comm: &Comm, c: &mut Checks) {
    let (r, p) = (comm.rank(), comm.size());
    // all-to-all with variable counts: rank s sends (d + s) % 3 + 1 values to rank d.
    c.jitter();
    let counts: Vec<usize> = (0..p).map(|d| (d + r) % 3 + 1).collect();
    let send: Vec<i64> = (0..p)
        .flat_map(|d| (0..counts[d]).map(move |i| (r * 1000 + d * 10 + i) as i64))
        .collect();
    let (recv, got) = comm.all_to_all_v(&send, &counts);
    let expected: Vec<i64> = (0..p)
        .flat_map(|s| (0..(r + s) % 3 + 1).map(move |i| (s * 1000 + r * 10 + i) as i64))
        .collect();
    c.check(
        "all_to_all_v",
        recv == expected && got == (0..p).map(|s| (r + s) % 3 + 1).collect::<Vec<_>>(),
    );

    // all-gather with variable counts: rank s contributes s + 1 copies of s.
    c.jitter();
    let (all, sizes) = comm.all_gather_v(&vec![r as i32; r + 1]);
    let expected: Vec<i32> = (0..p).flat_map(|s| vec![s as i32; s + 1]).collect();
    c.check(
        "all_gather_v",
        all == expected && sizes == (1..=p).collect::<Vec<_>>(),
    );

    // broadcast from the last rank.
    c.jitter();
    let mut b = if r == p - 1 {
        vec![7.5f64, -1.25]
    } else {
        vec![0.0; 2]
    };
    comm.broadcast(&mut b, p - 1);
    c.check("broadcast", b == vec![7.5, -1.25]);
}

/// Deterministic sums (reduce-scatter, ten all-reduces) and a rooted gather; returns the
/// digest of the all-reduce results.
fn sum_checks(comm: &Comm, c: &mut Checks) -> String {
    let (r, p) = (comm.rank(), comm.size());
    // Deterministic sums: the expected value adds ranks 0..P-1 in order, bit for bit.
    let len = 1003;
    let local: Vec<f32> = (0..len).map(|i| value(r, i)).collect();
    let in_order: Vec<f32> = (0..len)
        .map(|i| (1..p).fold(value(0, i), |acc, s| acc + value(s, i)))
        .collect();
    c.jitter();
    let chunk = comm.reduce_scatter_sum(&local);
    let mine = len * r / p..len * (r + 1) / p;
    c.check("reduce_scatter_sum", chunk == in_order[mine]);
    let mut digest = blake3::Hasher::new();
    for round in 0..10 {
        c.jitter();
        let mut x = local.clone();
        comm.all_reduce_sum(&mut x);
        c.check(&format!("all_reduce_sum round {round}"), x == in_order);
        for v in &x {
            digest.update(&v.to_le_bytes());
        }
    }
    // Gather to one root (the last rank): rank s contributes s + 2 copies of 10 s.
    c.jitter();
    let gathered = comm.gather_v(&vec![10 * r as i64; r + 2], p - 1);
    let expected: Vec<i64> = (0..p).flat_map(|s| vec![10 * s as i64; s + 2]).collect();
    c.check(
        "gather_v",
        match gathered {
            Some((all, sizes)) => {
                r == p - 1 && all == expected && sizes == (2..p + 2).collect::<Vec<_>>()
            }
            None => r != p - 1,
        },
    );
    digest.finalize().to_hex().to_string()
}

/// The nonblocking all-to-all, exchanges of nothing, and groups split by parity.
fn nonblocking_and_group_checks(comm: &Comm, c: &mut Checks) {
    let (r, p) = (comm.rank(), comm.size());
    // The nonblocking all-to-all delivers what the blocking one does, polled or not.
    let counts: Vec<usize> = (0..p).map(|d| (d * 5 + r) % 4).collect();
    let recv_counts: Vec<usize> = (0..p).map(|s| (r * 5 + s) % 4).collect();
    let send: Vec<f32> = (0..counts.iter().sum::<usize>())
        .map(|i| value(r, i))
        .collect();
    c.jitter();
    let blocking = comm.all_to_all_v(&send, &counts);
    let mut pending = comm.start_all_to_all_v(send.clone(), &counts, &recv_counts);
    c.jitter();
    pending.test();
    c.check("start_all_to_all_v", pending.wait() == blocking);

    // Nothing to move: empty buffers everywhere (MPI must not see them as aliased).
    c.jitter();
    let none: Vec<f32> = Vec::new();
    let empty = comm.all_to_all_v(&none, &vec![0; p]);
    let pending = comm.start_all_to_all_v(none.clone(), &vec![0; p], &vec![0; p]);
    let gathered = comm.all_gather_v(&none);
    let rooted = comm.gather_v(&none, 0);
    c.check(
        "empty_exchanges",
        empty.0.is_empty()
            && pending.wait().0.is_empty()
            && gathered.0.is_empty()
            && rooted.is_none_or(|(v, _)| v.is_empty()),
    );

    // Groups: ranks of the same parity sum among themselves.
    c.jitter();
    let group = comm.split(r % 2, r);
    let mut members = [1i64 << r];
    group.all_reduce_sum(&mut members);
    let want: i64 = (0..p).filter(|s| s % 2 == r % 2).map(|s| 1i64 << s).sum();
    c.check("split", members[0] == want && group.rank() == r / 2);
}

/// The top-K choices of `rank`'s token t: a fixed function of (rank, t), so every rank
/// can compute every other rank's routing. Ids >= `n` are zero experts.
fn choices(rank: usize, tokens: usize, k: usize, n: usize, zero: usize) -> Vec<i64> {
    (0..tokens)
        .flat_map(|t| {
            // K distinct experts per token.
            let start = (t * 7 + rank * 3) % (n + zero);
            (0..k).map(move |j| ((start + j * 3) % (n + zero)) as i64)
        })
        .collect()
}

/// Identity experts: each row comes back bit for bit, each owner receives rows of its own
/// experts only (the rows carry their source and token), and the combined MoE output
/// equals one process's. An error when an exchange fails.
fn ep_identity_check(par: &Parallel) -> Result<bool, CommError> {
    let (ep, e_rank) = (par.expert.size(), par.expert.rank());
    let (n, zero, k, h) = (8usize, 3usize, 3usize, 4i64);
    let tokens_of = |s: usize| 5 + 2 * s;
    let tokens = tokens_of(e_rank);
    // Row of token t: [source rank, t, then values].
    let x: Vec<f32> = (0..tokens)
        .flat_map(|t| [e_rank as f32, t as f32, value(e_rank, t), -value(t, e_rank)])
        .collect();
    let x = Tensor::from_slice(&x).view([tokens as i64, h]);
    let choice =
        Tensor::from_slice(&choices(e_rank, tokens, k, n, zero)).view([tokens as i64, k as i64]);
    let d = ExpertDispatch::new(&choice, n as i64, (n + zero) as i64);
    let sent = d.gather(&x);
    let plan = Plan::new(&par.expert, &d, Device::Cpu)?;
    let mut stats = ExchangeStats::default();
    let received = plan
        .start(&par.expert, None, &sent, Direction::ToOwners)?
        .wait(false, &mut stats)?;
    // Ownership: expert-major rows of local expert j come from tokens that chose it.
    let by_expert = plan.expert_major(&received);
    let mut row = 0i64;
    let mut owned = true;
    for (j, &count) in plan.local_counts.iter().enumerate() {
        let expert = (e_rank * (n / ep) + j) as i64;
        owned &= owner(expert as usize, n, ep) == e_rank;
        for _ in 0..count {
            let source = by_expert.double_value(&[row, 0]) as usize;
            let t = by_expert.double_value(&[row, 1]) as usize;
            owned &= choices(source, tokens_of(source), k, n, zero)[t * k..(t + 1) * k]
                .contains(&expert);
            row += 1;
        }
    }
    let returned = plan
        .start(
            &par.expert,
            None,
            &plan.source_major(&by_expert),
            Direction::Back,
        )?
        .wait(false, &mut stats)?;
    let weights = Tensor::from_slice(
        &(0..tokens * k)
            .map(|i| 0.25 + value(e_rank, i).abs().fract())
            .collect::<Vec<f32>>(),
    )
    .view([tokens as i64, k as i64]);
    let mask = ffn_choice_mask(&choice, n as i64, Kind::Float);
    let combined = d.combine(&returned, &weights, &mask, &x);
    let alone = d.combine(&sent, &weights, &mask, &x);
    Ok(owned && returned.equal(&sent) && combined.equal(&alone))
}

/// Gradients of a small model trained through the parallel schedule in this layout equal (within
/// 1e-6 relative per tensor) those of one process holding every expert and the whole
/// batch, computed on expert-parallel rank 0 of each replica. An error names the first
/// tensor that differs, or the exchange that failed.
fn ep_gradient_check(par: &Parallel) -> anyhow::Result<()> {
    let config: ModelConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 2,
        "q_lora_rank": 16, "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
        "v_head_dim": 8, "ffn_hidden_size": 48, "expert_ffn_hidden_size": 16,
        "n_routed_experts": 8, "zero_expert_num": 2, "moe_topk": 3,
        "target_ffn_experts": 2, "routed_scaling_factor": 2.0,
    }))
    .expect("a valid model config");
    let (world, rank) = (par.world.size(), par.world.rank());
    let (rows, seq) = (2i64, 12i64);
    let batch = |r: usize| {
        let ids: Vec<i64> = (0..rows * seq)
            .map(|i| (i * 13 + r as i64 * 29 + i * i) % 64)
            .collect();
        Tensor::from_slice(&ids).view([rows, seq])
    };
    let grads = |par: &Parallel, local: std::ops::Range<usize>, tokens: &Tensor| {
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let model = catapult_trainer::model::LongcatModel::with_experts(
            &vs.root(),
            &config,
            seq as usize,
            Kind::Float,
            Device::Cpu,
            local.clone(),
        );
        let std = config.initializer_range;
        catapult_trainer::init::InitPlan::plain(17, std, local).fill_all(&vs);
        let mut stats = ExchangeStats::default();
        let f = forward(
            &model,
            par,
            tokens,
            None,
            Training::Keep,
            &mut stats,
            &mut NoHooks,
        )?;
        let len = tokens.size()[1];
        let loss = f
            .logits
            .narrow(1, 0, len - 1)
            .reshape([-1, 64])
            .cross_entropy_for_logits(&tokens.narrow(1, 1, len - 1).reshape([-1]));
        let none = (0..config.num_layers).map(|_| None).collect();
        f.backward(&model, par, &loss, none, &mut stats, &mut NoHooks)?;
        let mut named: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(n, t)| (n, t.grad()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Ok::<_, CommError>(named)
    };
    let mine = grads(par, par.local_experts(8), &batch(rank))?;
    // Average over the world as the trainer does: dense over everyone, experts over
    // their replicas (each rank's loss is the mean over its own tokens).
    let mut reduced = Vec::new();
    for (name, g) in mine {
        let mut v: Vec<f32> = Vec::try_from(&g.reshape([-1])).expect("f32");
        if is_expert_param(&name) {
            par.replicas.all_reduce_sum(&mut v);
        } else {
            par.world.all_reduce_sum(&mut v);
        }
        let avg = Tensor::from_slice(&v).view(g.size().as_slice()) / world as f64;
        reduced.push((name, avg));
    }
    if par.expert.rank() != 0 {
        return Ok(());
    }
    // One process, every expert, every rank's sequences in rank order.
    let all = Tensor::cat(&(0..world).map(batch).collect::<Vec<_>>(), 0);
    let single = Parallel::single();
    let reference = grads(&single, 0..8, &all)?;
    let per = 8 / par.expert_size as i64;
    for ((name, got), (_, want)) in reduced.iter().zip(&reference) {
        let want = if is_expert_param(name) {
            want.narrow(0, 0, per)
        } else {
            want.shallow_clone()
        };
        let scale = want.abs().max().double_value(&[]).max(1e-12);
        let diff = (got - &want).abs().max().double_value(&[]) / scale;
        if diff > 1e-6 {
            anyhow::bail!("{name}: relative difference {diff:e}");
        }
    }
    Ok(())
}

/// The NCCL backend's conformance checks on this rank's GPU (one per rank).
fn nccl_check() -> Result<(), crate::Failure> {
    let comm = Comm::from_env()?;
    let (r, p) = (comm.rank(), comm.size());
    if let Err(why) = catapult_kernels::nccl::available() {
        println!(
            "{}",
            serde_json::json!({"rank": r, "size": p, "backend": "nccl", "skipped": why.to_string()})
        );
        return Ok(());
    }
    let local: usize = std::env::var("OMPI_COMM_WORLD_LOCAL_RANK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let device = Device::Cuda(local % tch::Cuda::device_count().max(1) as usize);
    let nccl = catapult_kernels::nccl::NcclComm::new(&comm, device)
        .map_err(|e| anyhow::anyhow!("rank {r}: {e}"))?;
    let mut failures: Vec<String> = Vec::new();
    let mut check = |name: &str, ok: bool| {
        if !ok {
            failures.push(name.to_string());
        }
    };
    // all-to-all of rows: rank s sends (d + s) % 3 + 1 rows of width 3 to rank d.
    let counts: Vec<usize> = (0..p).map(|d| (d + r) % 3 + 1).collect();
    let rows: Vec<f32> = (0..p)
        .flat_map(|d| (0..counts[d] * 3).map(move |i| (r * 1000 + d * 10) as f32 + i as f32))
        .collect();
    let recv_counts: Vec<usize> = (0..p).map(|s| (r + s) % 3 + 1).collect();
    let sent = Tensor::from_slice(&rows).view([-1, 3]).to_device(device);
    let got = nccl.all_to_all_rows(&sent, &counts, &recv_counts)?;
    let expected: Vec<f32> = (0..p)
        .flat_map(|s| (0..recv_counts[s] * 3).map(move |i| (s * 1000 + r * 10) as f32 + i as f32))
        .collect();
    check(
        "all_to_all_rows",
        Vec::<f32>::try_from(&got.to_device(Device::Cpu).reshape([-1])).ok() == Some(expected),
    );
    // Deterministic sum: bit for bit the rank-order sum.
    let len = 1003;
    let mine: Vec<f32> = (0..len).map(|i| value(r, i)).collect();
    let in_order: Vec<f32> = (0..len)
        .map(|i| (1..p).fold(value(0, i), |acc, s| acc + value(s, i)))
        .collect();
    let summed = nccl.all_reduce_sum(&Tensor::from_slice(&mine).to_device(device))?;
    check(
        "all_reduce_sum",
        Vec::<f32>::try_from(&summed.to_device(Device::Cpu)).ok() == Some(in_order),
    );
    // all-gather and broadcast from the last rank.
    let gathered = nccl.all_gather(&Tensor::from_slice(&[r as i64, 7]).to_device(device))?;
    let want: Vec<i64> = (0..p).flat_map(|s| [s as i64, 7]).collect();
    check(
        "all_gather",
        Vec::<i64>::try_from(&gathered.to_device(Device::Cpu).reshape([-1])).ok() == Some(want),
    );
    let b = nccl.broadcast(
        &Tensor::from_slice(&[r as f64 + 0.5]).to_device(device),
        p - 1,
    )?;
    check("broadcast", b.double_value(&[0]) == (p - 1) as f64 + 0.5);
    comm.barrier();
    println!(
        "{}",
        serde_json::json!({
            "rank": r,
            "size": p,
            "backend": "nccl",
            "nccl_version": nccl.version(),
            "failures": failures,
        })
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(anyhow::anyhow!("rank {r}: NCCL collectives failed: {}", failures.join(", ")).into())
    }
}
