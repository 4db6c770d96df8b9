//! The semantic checks a recipe must pass before any rank starts: what the types cannot
//! express. One function per section, run in a fixed order (`validate`), so the first
//! problem reported for a recipe never depends on how the checks are arranged. Each
//! error names the fields involved, the problem and the fix.
//!
//! It must not know how a recipe was read or overridden (`mod.rs`, `overrides`), nor
//! any trainer module: it sees the schema and the data crate's tokenizer only.

use super::error::RecipeError;
use super::schema::{
    Backend, BiasMode, DeviceKind, Group, KiSchedule, Recipe, SdcAction, ShardMode,
};

/// Semantic checks that the types cannot express. Each names the fields involved.
///
/// The order is part of the behaviour (a recipe with several problems reports the first
/// one), so new checks go where they belong in this sequence.
pub fn validate(r: &Recipe, origin: &str) -> Result<(), RecipeError> {
    validate_name(r, origin)?;
    validate_counts(r, origin)?;
    validate_system(r, origin)?;
    validate_model(r, origin)?;
    validate_moe(r, origin)?;
    validate_data(r, origin)?;
    validate_train(r, origin)?;
    validate_checkpoint(r, origin)?;
    validate_launch(r, origin)?;
    validate_parallel(r, origin)?;
    validate_adam_eps(r, origin)?;
    validate_transfer(r, origin)?;
    validate_growth(r, origin)?;
    validate_finite(r, origin)
}

/// Every number is finite: a NaN or an infinity that no check above caught (a gradient
/// clip, a bias rate, a loss scale) would reach the step and poison the weights.
fn validate_finite(r: &Recipe, origin: &str) -> Result<(), RecipeError> {
    fn walk(v: &serde_yaml_ng::Value, path: &mut Vec<String>) -> Option<(String, f64)> {
        use serde_yaml_ng::Value;
        match v {
            Value::Number(n) => n
                .as_f64()
                .filter(|x| !x.is_finite())
                .map(|x| (path.join("."), x)),
            Value::Mapping(m) => m.iter().find_map(|(k, v)| {
                path.push(k.as_str().unwrap_or("?").to_string());
                let found = walk(v, path);
                path.pop();
                found
            }),
            Value::Sequence(items) => items.iter().enumerate().find_map(|(i, v)| {
                let last = path.pop().unwrap_or_default();
                path.push(format!("{last}[{i}]"));
                let found = walk(v, path);
                path.pop();
                path.push(last);
                found
            }),
            _ => None,
        }
    }
    let tree = serde_yaml_ng::to_value(r).expect("a recipe serializes");
    match walk(&tree, &mut Vec::new()) {
        Some((field, x)) => fail(origin, &[&field], format!("is {x}"), "use a finite number"),
        None => Ok(()),
    }
}

/// The `Inconsistent` error of one check.
fn fail(origin: &str, fields: &[&str], problem: String, fix: &str) -> Result<(), RecipeError> {
    Err(RecipeError::Inconsistent {
        file: origin.into(),
        fields: fields.iter().map(|s| s.to_string()).collect(),
        problem,
        fix: fix.into(),
    })
}

/// The name: it names the run directory and the Slurm job, so it may hold only
/// letters, digits, '-', '_' and '.' (no path separators, spaces or control characters).
fn validate_name(r: &Recipe, origin: &str) -> Result<(), RecipeError> {
    let ok = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
    if !r.name.is_empty() && r.name.chars().all(ok) && !r.name.starts_with('.') {
        return Ok(());
    }
    fail(
        origin,
        &["name"],
        format!(
            "{:?} is not a usable name (it names the run directory runs/<name> and the Slurm job)",
            r.name
        ),
        "use letters, digits, '-', '_' and '.' only, not starting with '.'",
    )
}

/// True for a number above zero (false for NaN).
fn positive(x: f64) -> bool {
    x > 0.0
}

/// Every count that must be at least 1, across sections (checked before anything that
/// divides by one).
fn validate_counts(r: &Recipe, origin: &str) -> Result<(), RecipeError> {
    let err = |fields: &[&str], problem: String, fix: &str| fail(origin, fields, problem, fix);
    let m = &r.model;
    let counts = [
        ("model.hidden_size", m.hidden_size),
        ("model.num_layers", m.num_layers),
        ("model.num_attention_heads", m.num_attention_heads),
        ("model.q_lora_rank", m.q_lora_rank),
        ("model.kv_lora_rank", m.kv_lora_rank),
        ("model.v_head_dim", m.v_head_dim),
        ("model.ffn_hidden_size", m.ffn_hidden_size),
        ("model.expert_ffn_hidden_size", m.expert_ffn_hidden_size),
        ("model.moe_topk", m.moe_topk),
        ("data.seq_len", r.data.seq_len),
        ("train.steps", r.train.steps),
        ("train.global_batch_size", r.train.global_batch_size),
        ("train.micro_batch_size", r.train.micro_batch_size),
        ("train.eval_every", r.train.eval_every),
        ("train.eval_sequences", r.train.eval_sequences),
        ("train.log_every", r.train.log_every),
    ];
    for (name, v) in counts {
        if v == 0 {
            return err(&[name], "must be at least 1".into(), "set a positive value");
        }
    }
    Ok(())
}

/// `system`: the peak TFLOP/s, when given.
fn validate_system(r: &Recipe, origin: &str) -> Result<(), RecipeError> {
    let err = |fields: &[&str], problem: String, fix: &str| fail(origin, fields, problem, fix);
    if let Some(peak) = r.system.peak_tflops {
        if !positive(peak) {
            return err(
                &["system.peak_tflops"],
                format!("is {peak}"),
                "give the device's peak TFLOP/s as a positive number, or leave it out",
            );
        }
    }
    Ok(())
}

/// `model`: MLA shapes, the experts and K / K_e, gamma, MTP.
fn validate_model(r: &Recipe, origin: &str) -> Result<(), RecipeError> {
    let err = |fields: &[&str], problem: String, fix: &str| fail(origin, fields, problem, fix);
    let m = &r.model;
    if m.qk_rope_head_dim == 0 || !m.qk_rope_head_dim.is_multiple_of(2) {
        return err(
            &["model.qk_rope_head_dim"],
            format!(
                "is {}, but RoPE rotates pairs of dimensions",
                m.qk_rope_head_dim
            ),
            "use a positive even number",
        );
    }
    if m.q_lora_rank > m.hidden_size || m.kv_lora_rank > m.hidden_size {
        return err(
            &[
                "model.q_lora_rank",
                "model.kv_lora_rank",
                "model.hidden_size",
            ],
            format!(
                "the compression ranks ({}, {}) exceed the width {}",
                m.q_lora_rank, m.kv_lora_rank, m.hidden_size
            ),
            "use ranks no larger than hidden_size",
        );
    }
    if m.n_routed_experts == 0 {
        return err(
            &["model.n_routed_experts"],
            "must be at least 1".into(),
            "add FFN experts",
        );
    }
    if m.moe_topk > m.total_experts() {
        return err(
            &[
                "model.moe_topk",
                "model.n_routed_experts",
                "model.zero_expert_num",
            ],
            format!(
                "top-K = {} exceeds the {} experts (N = {} FFN + Z = {} zero)",
                m.moe_topk,
                m.total_experts(),
                m.n_routed_experts,
                m.zero_expert_num
            ),
            "lower moe_topk or add experts",
        );
    }
    let ke = m.target_ffn_experts();
    if ke > m.moe_topk || ke > m.n_routed_experts {
        return err(
            &["model.target_ffn_experts", "model.moe_topk"],
            format!(
                "K_e = {ke} exceeds top-K = {} or the {} FFN experts",
                m.moe_topk, m.n_routed_experts
            ),
            "K_e must satisfy K_e <= K and K_e <= n_routed_experts",
        );
    }
    if ke < m.moe_topk && m.zero_expert_num == 0 {
        return err(
            &["model.target_ffn_experts", "model.zero_expert_num"],
            format!(
                "K_e = {ke} < K = {} needs zero experts, but Z = 0",
                m.moe_topk
            ),
            "add zero experts or set target_ffn_experts equal to moe_topk",
        );
    }
    if !positive(m.routed_scaling_factor) {
        return err(
            &["model.routed_scaling_factor"],
            format!("is {}", m.routed_scaling_factor),
            "gamma must be positive (LongCat-Flash uses 6.0)",
        );
    }
    if m.mtp_layers > 1 {
        return err(
            &["model.mtp_layers"],
            format!("is {}, but one MTP layer is supported", m.mtp_layers),
            "use 0 or 1",
        );
    }
    if m.mtp_layers == 1 && r.data.seq_len < 2 {
        return err(
            &["model.mtp_layers", "data.seq_len"],
            "predicting token t+2 needs sequences of at least 2 tokens".into(),
            "raise seq_len",
        );
    }
    Ok(())
}

/// `moe`: load-balance groups, loss coefficients, metrics, the bias controller.
fn validate_moe(r: &Recipe, origin: &str) -> Result<(), RecipeError> {
    let err = |fields: &[&str], problem: String, fix: &str| fail(origin, fields, problem, fix);
    let m = &r.model;
    let moe = &r.moe;
    if moe.load_balance_groups == 0 || !m.n_routed_experts.is_multiple_of(moe.load_balance_groups) {
        return err(
            &["moe.load_balance_groups", "model.n_routed_experts"],
            format!(
                "D = {} groups do not divide the {} FFN experts",
                moe.load_balance_groups, m.n_routed_experts
            ),
            "choose D dividing n_routed_experts",
        );
    }
    if moe.load_balance_coeff < 0.0 || moe.z_loss_coeff < 0.0 {
        return err(
            &["moe.load_balance_coeff", "moe.z_loss_coeff"],
            "must not be negative".into(),
            "use 0 to disable a loss",
        );
    }
    if moe.metrics_every == 0 {
        return err(
            &["moe.metrics_every"],
            "must be at least 1".into(),
            "set a positive value",
        );
    }
    let bc = &moe.bias_control;
    if matches!(bc.mode, BiasMode::Longcat | BiasMode::Hold) && (bc.kp != 0.0 || bc.kd != 0.0) {
        return err(
            &[
                "moe.bias_control.mode",
                "moe.bias_control.kp",
                "moe.bias_control.kd",
            ],
            format!(
                "mode `{}` has no proportional or derivative term, but Kp or Kd is set",
                if bc.mode == BiasMode::Hold {
                    "hold"
                } else {
                    "longcat"
                }
            ),
            "use mode `pid` for proportional or derivative terms",
        );
    }
    if bc.ki < 0.0 || bc.ki_min < 0.0 || bc.ki_min > bc.ki {
        return err(
            &["moe.bias_control.ki", "moe.bias_control.ki_min"],
            format!("ki = {}, ki_min = {}", bc.ki, bc.ki_min),
            "need 0 <= ki_min <= ki",
        );
    }
    let hold_ok = bc.hold_gain > 0.0
        && bc.hold_gain <= 1.0
        && (0.0..bc.hold_gain).contains(&bc.hold_drift_gain)
        && bc.hold_max_shift > 0.0;
    if bc.mode == BiasMode::Hold && !hold_ok {
        return err(
            &[
                "moe.bias_control.hold_gain",
                "moe.bias_control.hold_drift_gain",
                "moe.bias_control.hold_max_shift",
            ],
            format!(
                "hold_gain {}, hold_drift_gain {}, hold_max_shift {}",
                bc.hold_gain, bc.hold_drift_gain, bc.hold_max_shift
            ),
            "need 0 < hold_gain <= 1, 0 <= hold_drift_gain < hold_gain (the loop is \
             stable only then) and hold_max_shift > 0",
        );
    }
    if bc.ki_schedule == KiSchedule::Step
        && (bc.ki_decay_interval == 0 || !(0.0..=1.0).contains(&bc.ki_decay_ratio))
    {
        return err(
            &[
                "moe.bias_control.ki_decay_interval",
                "moe.bias_control.ki_decay_ratio",
            ],
            format!(
                "interval {}, ratio {}",
                bc.ki_decay_interval, bc.ki_decay_ratio
            ),
            "use a positive interval and a ratio in [0, 1]",
        );
    }
    if bc.adapt_zero_experts && m.zero_expert_num == 0 {
        return err(
            &[
                "moe.bias_control.adapt_zero_experts",
                "model.zero_expert_num",
            ],
            "there are no zero experts to adapt".into(),
            "add zero experts or set adapt_zero_experts: false",
        );
    }
    Ok(())
}

/// The data section's checks: datasets, phases, streams and the tokenizer (loaded here,
/// so a missing tokenizer.json fails before any rank starts), then the validation split.
fn validate_data(r: &Recipe, origin: &str) -> Result<(), RecipeError> {
    let err = |fields: &[&str], problem: String, fix: &str| fail(origin, fields, problem, fix);
    validate_datasets(r, origin)?;
    validate_phases(r, origin)?;
    validate_streams(r, origin)?;
    validate_tokenizer(r, origin)?;
    if !(0.0..1.0).contains(&r.data.valid_fraction) || r.data.valid_fraction <= 0.0 {
        return err(
            &["data.valid_fraction"],
            format!("is {}", r.data.valid_fraction),
            "use a fraction in (0, 1), e.g. 0.02",
        );
    }
    Ok(())
}

/// `data.path` or `data.datasets` (one of them), unique names, usable weights.
fn validate_datasets(r: &Recipe, origin: &str) -> Result<(), RecipeError> {
    let err = |fields: &[&str], problem: String, fix: &str| fail(origin, fields, problem, fix);
    let d = &r.data;
    match (&d.path, d.datasets.is_empty()) {
        (None, true) => {
            return err(
                &["data.path", "data.datasets"],
                "no training data is named".into(),
                "set data.path to a prepared dataset, or list data.datasets",
            )
        }
        (Some(_), false) => {
            return err(
                &["data.path", "data.datasets"],
                "both are set".into(),
                "use data.path for one dataset or data.datasets for a mixture, not both",
            )
        }
        _ => {}
    }
    let list = d.dataset_list();
    for (i, ds) in list.iter().enumerate() {
        if list[..i].iter().any(|o| o.name == ds.name) {
            return err(
                &[&format!("data.datasets[{i}].name")],
                format!("`{}` is used twice", ds.name),
                "give every dataset its own name",
            );
        }
        if !(ds.weight >= 0.0 && ds.weight.is_finite()) {
            return err(
                &[&format!("data.datasets[{i}].weight")],
                format!("is {}", ds.weight),
                "use a finite weight >= 0",
            );
        }
    }
    Ok(())
}

/// `data.phases`: increasing starts, known dataset names, usable weights and lengths;
/// every phase has some weight.
fn validate_phases(r: &Recipe, origin: &str) -> Result<(), RecipeError> {
    let err = |fields: &[&str], problem: String, fix: &str| fail(origin, fields, problem, fix);
    let d = &r.data;
    let list = d.dataset_list();
    let mut previous = 0;
    for (i, p) in d.phases.iter().enumerate() {
        let field = format!("data.phases[{i}]");
        if p.start_tokens <= previous {
            return err(
                &[&format!("{field}.start_tokens")],
                format!(
                    "{} does not come after the previous phase's start ({previous})",
                    p.start_tokens
                ),
                "list phases in increasing start_tokens, all above 0",
            );
        }
        previous = p.start_tokens;
        for (name, w) in &p.weights {
            if !list.iter().any(|ds| &ds.name == name) {
                return err(
                    &[&format!("{field}.weights.{name}")],
                    format!("no dataset is named `{name}`"),
                    &format!(
                        "use one of: {}",
                        list.iter()
                            .map(|ds| ds.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
            if !(*w >= 0.0 && w.is_finite()) {
                return err(
                    &[&format!("{field}.weights.{name}")],
                    format!("is {w}"),
                    "use a finite weight >= 0",
                );
            }
        }
        if p.seq_len == Some(0) {
            return err(
                &[&format!("{field}.seq_len")],
                "must be at least 1".into(),
                "set a positive length",
            );
        }
    }
    for (i, phase) in d.resolved_phases().iter().enumerate() {
        if phase.weights.iter().sum::<f64>() <= 0.0 {
            let field = if i == 0 {
                "data.datasets".to_string()
            } else {
                format!("data.phases[{}].weights", i - 1)
            };
            return err(
                &[&field],
                "every weight is 0".into(),
                "give at least one dataset a positive weight",
            );
        }
    }
    Ok(())
}

/// `data.streams` against the global batch, and the pipeline's buffers.
fn validate_streams(r: &Recipe, origin: &str) -> Result<(), RecipeError> {
    let err = |fields: &[&str], problem: String, fix: &str| fail(origin, fields, problem, fix);
    let d = &r.data;
    let g = r.train.global_batch_size;
    if !g.is_multiple_of(d.streams) {
        let divisors: Vec<String> = (1..=g.min(64))
            .filter(|k| g.is_multiple_of(*k))
            .map(|k| k.to_string())
            .collect();
        return err(
            &["data.streams", "train.global_batch_size"],
            format!(
                "{} streams cannot split a global batch of {g} sequences evenly",
                d.streams
            ),
            &format!(
                "set data.streams to a divisor of the global batch ({})",
                divisors.join(", ")
            ),
        );
    }
    for (name, v) in [
        ("data.shuffle_buffer", d.shuffle_buffer as u64),
        ("data.mixture_window", d.mixture_window as u64),
        ("data.workers", d.workers as u64),
        ("data.read_ahead_mb", d.read_ahead_mb),
    ] {
        if v == 0 {
            return err(&[name], "must be at least 1".into(), "set a positive value");
        }
    }
    Ok(())
}

/// `data.tokenizer` loads, and `model.vocab_size` holds its ids.
fn validate_tokenizer(r: &Recipe, origin: &str) -> Result<(), RecipeError> {
    let err = |fields: &[&str], problem: String, fix: &str| fail(origin, fields, problem, fix);
    let d = &r.data;
    let tokenizer = match catapult_data::Tokenizer::load(&d.tokenizer, d.eod_token.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            return err(
                &["data.tokenizer"],
                e.to_string(),
                "fix data.tokenizer (or data.eod_token)",
            )
        }
    };
    if r.model.vocab_size < tokenizer.vocab_size() {
        return err(
            &["model.vocab_size", "data.tokenizer"],
            format!(
                "{} rows cannot hold the tokenizer's {} ids",
                r.model.vocab_size,
                tokenizer.vocab_size()
            ),
            &format!(
                "raise model.vocab_size to at least {}",
                tokenizer.vocab_size()
            ),
        );
    }
    Ok(())
}

/// `train`: batch split, learning rates, warmup, decay, AdamW betas.
fn validate_train(r: &Recipe, origin: &str) -> Result<(), RecipeError> {
    let err = |fields: &[&str], problem: String, fix: &str| fail(origin, fields, problem, fix);
    let t = &r.train;
    if !t.global_batch_size.is_multiple_of(t.micro_batch_size) {
        return err(
            &["train.global_batch_size", "train.micro_batch_size"],
            format!(
                "the global batch {} is not divisible by the micro-batch {}",
                t.global_batch_size, t.micro_batch_size
            ),
            "make global_batch_size a multiple of micro_batch_size",
        );
    }
    if !positive(t.lr) || t.min_lr < 0.0 || t.min_lr > t.lr {
        return err(
            &["train.lr", "train.min_lr"],
            format!("lr = {}, min_lr = {}", t.lr, t.min_lr),
            "need 0 <= min_lr <= lr and lr > 0",
        );
    }
    if t.warmup_steps > t.steps {
        return err(
            &["train.warmup_steps", "train.steps"],
            format!("{} warmup steps exceed {} steps", t.warmup_steps, t.steps),
            "shorten the warmup",
        );
    }
    if !(0.0..=1.0).contains(&t.decay_fraction) {
        return err(
            &["train.decay_fraction"],
            format!("is {}", t.decay_fraction),
            "use 0..1",
        );
    }
    for (name, b) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
        if !(0.0..1.0).contains(&b) {
            return err(&[name], format!("is {b}"), "use a value in [0, 1)");
        }
    }
    Ok(())
}

/// `train.sdc_action: rollback` needs `checkpoint.every`.
fn validate_checkpoint(r: &Recipe, origin: &str) -> Result<(), RecipeError> {
    let err = |fields: &[&str], problem: String, fix: &str| fail(origin, fields, problem, fix);
    let t = &r.train;
    if t.sdc_action == SdcAction::Rollback && t.sdc_check_every > 0 && r.checkpoint.every == 0 {
        return err(
            &["train.sdc_action", "checkpoint.every"],
            "rollback needs checkpoints to roll back to, but checkpoint.every is 0".into(),
            "set checkpoint.every (e.g. 100) or use sdc_action: stop",
        );
    }
    Ok(())
}

/// `launch`: hang timeout and restart backoff.
fn validate_launch(r: &Recipe, origin: &str) -> Result<(), RecipeError> {
    let err = |fields: &[&str], problem: String, fix: &str| fail(origin, fields, problem, fix);
    let l = &r.launch;
    if !positive(l.heartbeat_timeout_s) || l.restart_backoff_s < 0.0 {
        return err(
            &["launch.heartbeat_timeout_s", "launch.restart_backoff_s"],
            format!(
                "timeout {} s, backoff {} s",
                l.heartbeat_timeout_s, l.restart_backoff_s
            ),
            "use a positive timeout (longer than the slowest step, evaluation or checkpoint) \
             and a backoff >= 0",
        );
    }
    Ok(())
}

/// `parallel`: the backend fits the device, the experts split over expert parallelism.
fn validate_parallel(r: &Recipe, origin: &str) -> Result<(), RecipeError> {
    let err = |fields: &[&str], problem: String, fix: &str| fail(origin, fields, problem, fix);
    let m = &r.model;
    let par = &r.parallel;
    if par.backend == Backend::Nccl && r.system.device != DeviceKind::Cuda {
        return err(
            &["parallel.backend", "system.device"],
            "NCCL moves CUDA tensors, but the device is the CPU".into(),
            "set system.device: cuda, or parallel.backend: mpi (or auto)",
        );
    }
    if par.expert == 0 {
        return err(
            &["parallel.expert"],
            "must be at least 1".into(),
            "use 1 for no expert parallelism",
        );
    }
    if par.shard == ShardMode::Parameters && par.fast_reductions {
        return err(
            &["parallel.shard", "parallel.fast_reductions"],
            "shard: parameters keeps the bits of shard: none by summing every reduction in \
             rank order, and fast_reductions asks the backend to sum in whatever order its \
             messages arrive"
                .into(),
            "set parallel.fast_reductions: false (it only speeds up the loss and count sums), \
             or use parallel.shard: gradients",
        );
    }
    if !m.n_routed_experts.is_multiple_of(par.expert) {
        return err(
            &["parallel.expert", "model.n_routed_experts"],
            format!(
                "{} FFN experts do not split evenly over {} expert-parallel ranks",
                m.n_routed_experts, par.expert
            ),
            "use an expert-parallel size that divides n_routed_experts",
        );
    }
    Ok(())
}

/// `train.adam_eps` (checked after `parallel`, where it always was).
fn validate_adam_eps(r: &Recipe, origin: &str) -> Result<(), RecipeError> {
    let err = |fields: &[&str], problem: String, fix: &str| fail(origin, fields, problem, fix);
    let t = &r.train;
    if !positive(t.adam_eps) {
        return err(
            &["train.adam_eps"],
            format!("is {}", t.adam_eps),
            "use e.g. 1e-16",
        );
    }
    Ok(())
}

/// `transfer.proxy`: a width, and positive finite values (norms take no init std).
fn validate_transfer(r: &Recipe, origin: &str) -> Result<(), RecipeError> {
    let err = |fields: &[&str], problem: String, fix: &str| fail(origin, fields, problem, fix);
    if let Some(tr) = &r.transfer {
        let p = &tr.proxy;
        if p.hidden_size == 0 {
            return err(
                &["transfer.proxy.hidden_size"],
                "is 0".into(),
                "give the width the hyperparameters were tuned at",
            );
        }
        let mut values = vec![
            ("transfer.proxy.lr".to_string(), p.lr),
            ("transfer.proxy.init_std".to_string(), p.init_std),
        ];
        for (g, o) in &p.groups {
            values.push((format!("transfer.proxy.groups.{g}.lr"), o.lr));
            values.push((format!("transfer.proxy.groups.{g}.init_std"), o.init_std));
        }
        if p.groups
            .get(&Group::Norms)
            .is_some_and(|o| o.init_std.is_some())
        {
            return err(
                &["transfer.proxy.groups.norms.init_std"],
                "is set, but norm gains always start at 1".into(),
                "remove it (norms take only an lr override)",
            );
        }
        for (field, v) in values {
            if let Some(v) = v {
                if !positive(v) || !v.is_finite() {
                    return err(&[&field], format!("is {v}"), "use a positive number");
                }
            }
        }
    }
    Ok(())
}

/// `growth`: the stack repeats whole, and growth falls inside the run.
fn validate_growth(r: &Recipe, origin: &str) -> Result<(), RecipeError> {
    let err = |fields: &[&str], problem: String, fix: &str| fail(origin, fields, problem, fix);
    let m = &r.model;
    let t = &r.train;
    if let Some(g) = &r.growth {
        if g.from_layers == 0
            || m.num_layers < 2 * g.from_layers
            || !m.num_layers.is_multiple_of(g.from_layers)
        {
            return err(
                &["growth.from_layers", "model.num_layers"],
                format!(
                    "{} layers cannot be stacked from {} (the stack is repeated whole)",
                    m.num_layers, g.from_layers
                ),
                "use a from_layers that divides model.num_layers and is at most half of it",
            );
        }
        let per_step = (t.global_batch_size * r.data.seq_len) as u64;
        if g.until_tokens == 0 || g.until_tokens >= per_step * t.steps as u64 {
            return err(
                &["growth.until_tokens", "train.steps"],
                format!(
                    "growth at {} tokens is not inside the run ({} steps x {per_step} tokens)",
                    g.until_tokens, t.steps
                ),
                "grow after at least one step and before the last",
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::recipe::fixtures::*;
    use crate::recipe::{parse, Override};

    #[test]
    fn mixtures_and_phases_resolve_and_are_checked() {
        let mix = "data:\n  seq_len: 16\n  datasets:\n    - {name: web, path: a, weight: 0.7}\n    - {name: code, path: b, weight: 0.3}\n  phases:\n    - {start_tokens: 1000, weights: {code: 0.6}}\n    - {start_tokens: 5000, seq_len: 32}\n";
        let r = data_section(mix).unwrap();
        let phases = r.data.resolved_phases();
        assert_eq!(phases.len(), 3);
        assert_eq!(phases[1].weights, vec![0.7, 0.6]);
        assert_eq!((phases[2].seq_len, phases[2].start_tokens), (32, 5000));
        assert_eq!(phases[2].weights, vec![0.7, 0.6]);
        assert_eq!(r.data.max_seq_len(), 32);
        let cfg = r.pipeline_config();
        assert_eq!(cfg.datasets[1].location, "b");

        let m = message(data_section(
            &mix.replace("weights: {code: 0.6}", "weights: {cod: 0.6}"),
        ));
        assert!(
            m.contains("`data.phases[0].weights.cod`") && m.contains("web, code"),
            "{m}"
        );
        let m = message(data_section(
            &mix.replace("start_tokens: 5000", "start_tokens: 1000"),
        ));
        assert!(m.contains("`data.phases[1].start_tokens`"), "{m}");
        let m = message(data_section(&mix.replace("name: code", "name: web")));
        assert!(m.contains("used twice"), "{m}");
        let m = message(data_section(&format!("{mix}  path: c\n")));
        assert!(m.contains("both are set"), "{m}");
        let m = message(data_section("data:\n  seq_len: 16\n"));
        assert!(m.contains("no training data is named"), "{m}");
    }

    #[test]
    fn a_missing_tokenizer_fails_at_validation() {
        let m = message(with("data.tokenizer=/no/such/tokenizer.json"));
        assert!(
            m.contains("`data.tokenizer`") && m.contains("/no/such/tokenizer.json"),
            "{m}"
        );
        assert!(m.contains("catapult data tokenizer train"), "{m}");
    }

    #[test]
    fn topk_larger_than_experts_is_rejected() {
        let m = message(with("model.moe_topk=7"));
        assert!(m.contains("`model.moe_topk`"), "{m}");
        assert!(m.contains("exceeds the 6 experts"), "{m}");
    }

    #[test]
    fn target_ffn_experts_above_topk_is_rejected() {
        let m = message(with("model.target_ffn_experts=3"));
        assert!(m.contains("`model.target_ffn_experts`"), "{m}");
        assert!(m.contains("K_e = 3"), "{m}");
    }

    #[test]
    fn ke_below_k_without_zero_experts_is_rejected() {
        let m = message(parse(
            GOOD,
            "r.yaml",
            &[Override::parse("model.zero_expert_num=0").unwrap()],
        ));
        assert!(m.contains("`model.zero_expert_num`"), "{m}");
    }

    #[test]
    fn odd_rope_dim_is_rejected() {
        let m = message(with("model.qk_rope_head_dim=7"));
        assert!(m.contains("`model.qk_rope_head_dim`"), "{m}");
        assert!(m.contains("even"), "{m}");
    }

    #[test]
    fn batch_not_divisible_by_micro_batch_is_rejected() {
        let m = message(with("train.micro_batch_size=3"));
        assert!(
            m.contains("`train.global_batch_size` and `train.micro_batch_size`"),
            "{m}"
        );
    }

    #[test]
    fn sharded_parameters_refuse_fast_reductions_and_allow_deterministic_ones() {
        let m = message(with_all(&[
            "parallel.shard=parameters",
            "parallel.fast_reductions=true",
        ]));
        assert!(
            m.contains("`parallel.shard` and `parallel.fast_reductions`")
                && m.contains("fast_reductions: false"),
            "{m}"
        );
        assert!(with_all(&["parallel.shard=parameters"]).is_ok());
        assert!(with_all(&["parallel.shard=gradients", "parallel.fast_reductions=true"]).is_ok());
    }

    #[test]
    fn small_vocab_is_rejected() {
        let m = message(with("model.vocab_size=100"));
        assert!(m.contains("`model.vocab_size`"), "{m}");
    }

    #[test]
    fn rank_above_width_is_rejected() {
        let m = message(with("model.q_lora_rank=128"));
        assert!(m.contains("`model.q_lora_rank`"), "{m}");
    }

    #[test]
    fn warmup_longer_than_run_is_rejected() {
        let m = message(with("train.warmup_steps=11"));
        assert!(m.contains("`train.warmup_steps`"), "{m}");
    }

    #[test]
    fn groups_not_dividing_experts_are_rejected() {
        let m = message(with("moe.load_balance_groups=3"));
        assert!(
            m.contains("`moe.load_balance_groups` and `model.n_routed_experts`"),
            "{m}"
        );
    }

    #[test]
    fn longcat_mode_with_proportional_gain_is_rejected() {
        let m = message(with("moe.bias_control.kp=0.1"));
        assert!(m.contains("`moe.bias_control.mode`"), "{m}");
        assert!(with("moe.bias_control.mode=pid").is_ok());
    }

    #[test]
    fn growth_schedules_must_stack_whole_and_fall_inside_the_run() {
        // 10 steps x 4 sequences x 16 tokens = 640 tokens in the run.
        let grow = |extra: &[&str]| {
            let mut keys = vec!["model.num_layers=4", "growth.from_layers=2"];
            keys.extend(extra);
            with_all(&keys)
        };
        assert!(grow(&["growth.until_tokens=320"]).is_ok());
        let m = message(grow(&["growth.until_tokens=320", "growth.from_layers=3"]));
        assert!(
            m.contains("`growth.from_layers` and `model.num_layers`"),
            "{m}"
        );
        let m = message(grow(&["growth.until_tokens=640"]));
        assert!(m.contains("`growth.until_tokens`"), "{m}");
        let m = message(grow(&["growth.until_tokens=320", "growth.optimizer=keep"]));
        assert!(m.contains("growth.optimizer"), "{m}");
    }

    #[test]
    fn transfer_values_and_group_names_are_checked() {
        let proxy = "transfer.proxy.hidden_size=16";
        assert!(with_all(&[proxy, "transfer.proxy.groups.router.lr=0.01"]).is_ok());
        let m = message(with_all(&[proxy, "transfer.proxy.groups.router.lr=-1"]));
        assert!(m.contains("`transfer.proxy.groups.router.lr`"), "{m}");
        let m = message(with_all(&[proxy, "transfer.proxy.groups.routers.lr=0.01"]));
        assert!(m.contains("routers"), "{m}");
        let m = message(with_all(&[
            proxy,
            "transfer.proxy.groups.norms.init_std=0.5",
        ]));
        assert!(m.contains("`transfer.proxy.groups.norms.init_std`"), "{m}");
        let m = message(with_all(&["transfer.proxy.hidden_size=0"]));
        assert!(m.contains("`transfer.proxy.hidden_size`"), "{m}");
    }
}
