//! A test of every message `recipe` can produce, byte for byte, against
//! `testdata/messages.txt`: one case per check (and per parse and `--set` error), plus
//! recipes with several problems, whose first problem must stay the one reported.
//! Test-only; it sees the module's entry points and nothing outside `recipe`.
//!
//! After deliberately changing a message, rewrite the file with
//! `RECIPE_GOLDEN_WRITE=1 cargo test -p catapult-trainer --lib recipe::golden` and
//! review its diff.

use super::fixtures::GOOD;
use super::{load, parse, Override};

/// A replacement in `GOOD` (`from` empty: none) and `--set` arguments.
type Case = (&'static str, String, Vec<&'static str>);

const MIX: &str = "data:\n  seq_len: 16\n  datasets:\n    - {name: web, path: a, weight: 0.7}\n    - {name: code, path: b, weight: 0.3}\n  phases:\n    - {start_tokens: 1000, weights: {code: 0.6}}\n    - {start_tokens: 5000, seq_len: 32}\n";
const DATA: &str = "data:\n  path: x\n  seq_len: 16\n";

/// Parse errors, `--set` errors and the counts checked first.
fn parse_cases() -> Vec<Case> {
    vec![
        // parse-level
        ("", String::new(), vec!["model.hidden_size=0"]),
        ("  num_layers: 1", "  num_layer: 1".into(), vec![]),
        (
            "  num_layers: 1",
            "  num_layers: 1\n  zzz: 1".into(),
            vec![],
        ),
        ("name: t\n", "name: t\ntrian: 1\n".into(), vec![]),
        ("name: t\n", "".into(), vec![]),
        ("hidden_size: 64", "hidden_size: wide".into(), vec![]),
        ("  seq_len: 16\n", "".into(), vec![]),
        ("  lr: 0.001\n", "  lr: 0.001\n  lr: 0.002\n".into(), vec![]),
        ("model:\n", "model: [\n".into(), vec![]),
        ("name: t\n", "name: t\n\tbad: 1\n".into(), vec![]),
        ("", String::new(), vec!["system.precision=fp8"]),
        ("", String::new(), vec!["system.device=tpu"]),
        ("", String::new(), vec!["model.layers=4"]),
        ("", String::new(), vec!["layers=4"]),
        ("", String::new(), vec!["model.zzz.yyy=4"]),
        ("", String::new(), vec!["train.steps=many"]),
        ("", String::new(), vec!["train.steps=1", "train.steps=many"]),
        ("", String::new(), vec!["name.x=1"]),
        ("", String::new(), vec!["model.num_layers.x=1"]),
        ("", String::new(), vec!["growth.optimizer=keep"]),
        ("", String::new(), vec!["growth.from_layers=2"]),
        (
            "",
            String::new(),
            vec![
                "transfer.proxy.groups.routers.lr=0.01",
                "transfer.proxy.hidden_size=16",
            ],
        ),
        (
            "",
            String::new(),
            vec!["data.datasets=[{name: a}]", "data.path=null"],
        ),
        // counts
        (
            "",
            String::new(),
            vec!["model.hidden_size=0", "train.steps=0"],
        ),
        ("", String::new(), vec!["model.num_layers=0"]),
        ("", String::new(), vec!["model.num_attention_heads=0"]),
        ("", String::new(), vec!["model.q_lora_rank=0"]),
        ("", String::new(), vec!["model.kv_lora_rank=0"]),
        ("", String::new(), vec!["model.v_head_dim=0"]),
        ("", String::new(), vec!["model.ffn_hidden_size=0"]),
        ("", String::new(), vec!["model.expert_ffn_hidden_size=0"]),
        ("", String::new(), vec!["model.moe_topk=0"]),
        ("", String::new(), vec!["data.seq_len=0"]),
        ("", String::new(), vec!["train.steps=0"]),
        ("", String::new(), vec!["train.global_batch_size=0"]),
        ("", String::new(), vec!["train.micro_batch_size=0"]),
        ("", String::new(), vec!["train.eval_every=0"]),
        ("", String::new(), vec!["train.eval_sequences=0"]),
        ("", String::new(), vec!["train.log_every=0"]),
        (
            "",
            String::new(),
            vec!["train.log_every=0", "system.peak_tflops=0"],
        ),
    ]
}

/// `system`, `model` and `moe`.
fn model_cases() -> Vec<Case> {
    vec![
        // system
        ("", String::new(), vec!["system.peak_tflops=0"]),
        (
            "",
            String::new(),
            vec!["system.peak_tflops=-1", "model.qk_rope_head_dim=7"],
        ),
        ("", String::new(), vec!["system.peak_tflops=.nan"]),
        // model
        ("", String::new(), vec!["model.qk_rope_head_dim=7"]),
        ("", String::new(), vec!["model.qk_rope_head_dim=0"]),
        ("", String::new(), vec!["model.q_lora_rank=128"]),
        ("", String::new(), vec!["model.kv_lora_rank=65"]),
        ("", String::new(), vec!["model.n_routed_experts=0"]),
        ("", String::new(), vec!["model.moe_topk=7"]),
        ("", String::new(), vec!["model.target_ffn_experts=3"]),
        (
            "",
            String::new(),
            vec!["model.target_ffn_experts=5", "model.moe_topk=6"],
        ),
        ("", String::new(), vec!["model.zero_expert_num=0"]),
        ("", String::new(), vec!["model.routed_scaling_factor=0"]),
        ("", String::new(), vec!["model.routed_scaling_factor=.nan"]),
        ("", String::new(), vec!["model.mtp_layers=2"]),
        (
            "",
            String::new(),
            vec!["model.mtp_layers=1", "data.seq_len=1"],
        ),
        (
            "",
            String::new(),
            vec!["model.mtp_layers=2", "moe.metrics_every=0"],
        ),
        // moe
        ("", String::new(), vec!["moe.load_balance_groups=3"]),
        ("", String::new(), vec!["moe.load_balance_groups=0"]),
        ("", String::new(), vec!["moe.load_balance_coeff=-1"]),
        ("", String::new(), vec!["moe.z_loss_coeff=-1"]),
        ("", String::new(), vec!["moe.metrics_every=0"]),
        ("", String::new(), vec!["moe.bias_control.kp=0.1"]),
        ("", String::new(), vec!["moe.bias_control.kd=0.1"]),
        ("", String::new(), vec!["moe.bias_control.ki=-1"]),
        ("", String::new(), vec!["moe.bias_control.ki_min=1"]),
        (
            "",
            String::new(),
            vec![
                "moe.bias_control.ki_schedule=step",
                "moe.bias_control.ki_decay_ratio=2",
            ],
        ),
        (
            "",
            String::new(),
            vec![
                "moe.bias_control.ki_schedule=step",
                "moe.bias_control.ki_decay_interval=0",
            ],
        ),
        (
            "",
            String::new(),
            vec!["moe.bias_control.ki_decay_interval=0"],
        ),
        (
            "",
            String::new(),
            vec![
                "moe.bias_control.adapt_zero_experts=true",
                "model.zero_expert_num=0",
                "model.target_ffn_experts=2",
            ],
        ),
        (
            "",
            String::new(),
            vec![
                "moe.bias_control.adapt_zero_experts=true",
                "model.zero_expert_num=0",
                "model.target_ffn_experts=2",
                "data.streams=3",
            ],
        ),
    ]
}

/// `data`.
fn data_cases() -> Vec<Case> {
    let (mix, data0) = (MIX, DATA);
    vec![
        // data
        (data0, "data:\n  seq_len: 16\n".into(), vec![]),
        (data0, format!("{mix}  path: c\n"), vec![]),
        (data0, mix.replace("name: code", "name: web"), vec![]),
        (data0, mix.replace("weight: 0.3", "weight: -1"), vec![]),
        (data0, mix.replace("weight: 0.3", "weight: .nan"), vec![]),
        (data0, mix.replace("weight: 0.3", "weight: .inf"), vec![]),
        (
            data0,
            mix.replace("start_tokens: 5000", "start_tokens: 1000"),
            vec![],
        ),
        (
            data0,
            mix.replace("start_tokens: 1000", "start_tokens: 0"),
            vec![],
        ),
        (
            data0,
            mix.replace("weights: {code: 0.6}", "weights: {cod: 0.6}"),
            vec![],
        ),
        (
            data0,
            mix.replace("weights: {code: 0.6}", "weights: {code: -0.6}"),
            vec![],
        ),
        (data0, mix.replace("seq_len: 32", "seq_len: 0"), vec![]),
        (
            data0,
            mix.replace("weight: 0.3", "weight: 0")
                .replace("weight: 0.7", "weight: 0"),
            vec![],
        ),
        (
            data0,
            mix.replace("weights: {code: 0.6}", "weights: {code: 0, web: 0}"),
            vec![],
        ),
        (data0, mix.to_string(), vec![]),
        (
            data0,
            mix.to_string(),
            vec!["data.streams=3", "train.global_batch_size=12"],
        ),
        ("", String::new(), vec!["data.streams=3"]),
        (
            "",
            String::new(),
            vec!["data.streams=3", "train.global_batch_size=130"],
        ),
        ("", String::new(), vec!["data.shuffle_buffer=0"]),
        ("", String::new(), vec!["data.mixture_window=0"]),
        ("", String::new(), vec!["data.workers=0"]),
        ("", String::new(), vec!["data.read_ahead_mb=0"]),
        (
            "",
            String::new(),
            vec!["data.tokenizer=/no/such/tokenizer.json"],
        ),
        ("", String::new(), vec!["data.eod_token=<x>"]),
        ("", String::new(), vec!["model.vocab_size=100"]),
        ("", String::new(), vec!["data.valid_fraction=0"]),
        ("", String::new(), vec!["data.valid_fraction=1"]),
        ("", String::new(), vec!["data.valid_fraction=.nan"]),
        (
            "",
            String::new(),
            vec!["data.valid_fraction=0", "train.micro_batch_size=3"],
        ),
    ]
}

/// `train`, `launch` and `parallel`.
fn later_cases() -> Vec<Case> {
    vec![
        // train
        ("", String::new(), vec!["train.micro_batch_size=3"]),
        ("", String::new(), vec!["train.lr=0"]),
        ("", String::new(), vec!["train.min_lr=1"]),
        ("", String::new(), vec!["train.min_lr=-1"]),
        ("", String::new(), vec!["train.warmup_steps=11"]),
        ("", String::new(), vec!["train.decay_fraction=2"]),
        ("", String::new(), vec!["train.beta1=1"]),
        ("", String::new(), vec!["train.beta2=-0.1"]),
        (
            "",
            String::new(),
            vec!["train.sdc_action=rollback", "train.sdc_check_every=5"],
        ),
        ("", String::new(), vec!["train.sdc_action=rollback"]),
        (
            "",
            String::new(),
            vec![
                "train.sdc_action=rollback",
                "train.sdc_check_every=5",
                "checkpoint.every=5",
            ],
        ),
        // launch
        ("", String::new(), vec!["launch.heartbeat_timeout_s=0"]),
        ("", String::new(), vec!["launch.restart_backoff_s=-1"]),
        (
            "",
            String::new(),
            vec![
                "launch.restart_backoff_s=-1",
                "train.sdc_action=rollback",
                "train.sdc_check_every=5",
            ],
        ),
        // parallel
        ("", String::new(), vec!["parallel.backend=nccl"]),
        (
            "",
            String::new(),
            vec!["parallel.backend=nccl", "system.device=cuda"],
        ),
        ("", String::new(), vec!["parallel.expert=0"]),
        ("", String::new(), vec!["parallel.expert=3"]),
        (
            "",
            String::new(),
            vec!["parallel.expert=3", "launch.heartbeat_timeout_s=0"],
        ),
        ("", String::new(), vec!["train.adam_eps=0"]),
        (
            "",
            String::new(),
            vec!["train.adam_eps=0", "parallel.expert=3"],
        ),
        ("", String::new(), vec!["train.adam_eps=0", "train.beta1=1"]),
    ]
}

/// `transfer`.
fn transfer_cases() -> Vec<Case> {
    vec![
        // transfer
        ("", String::new(), vec!["transfer.proxy.hidden_size=0"]),
        (
            "",
            String::new(),
            vec!["transfer.proxy.hidden_size=0", "train.adam_eps=0"],
        ),
        (
            "",
            String::new(),
            vec!["transfer.proxy.hidden_size=16", "transfer.proxy.lr=-1"],
        ),
        (
            "",
            String::new(),
            vec![
                "transfer.proxy.hidden_size=16",
                "transfer.proxy.init_std=.inf",
            ],
        ),
        (
            "",
            String::new(),
            vec![
                "transfer.proxy.hidden_size=16",
                "transfer.proxy.groups.router.lr=-1",
            ],
        ),
        (
            "",
            String::new(),
            vec![
                "transfer.proxy.hidden_size=16",
                "transfer.proxy.groups.dense_ffn.init_std=0",
            ],
        ),
        (
            "",
            String::new(),
            vec![
                "transfer.proxy.hidden_size=16",
                "transfer.proxy.groups.norms.init_std=0.5",
            ],
        ),
        (
            "",
            String::new(),
            vec![
                "transfer.proxy.hidden_size=16",
                "transfer.proxy.groups.norms.init_std=0.5",
                "transfer.proxy.lr=-1",
            ],
        ),
        (
            "",
            String::new(),
            vec![
                "transfer.proxy.hidden_size=16",
                "transfer.proxy.groups.experts.lr=-1",
                "transfer.proxy.lr=-2",
            ],
        ),
        (
            "",
            String::new(),
            vec![
                "transfer.proxy.hidden_size=16",
                "transfer.proxy.groups.head={lr: 1, zz: 2}",
            ],
        ),
        ("", String::new(), vec!["transfer.proxy.lr=1"]),
    ]
}

/// `growth`, and accepted recipes.
fn last_cases() -> Vec<Case> {
    let (mix, data0) = (MIX, DATA);
    vec![
        // growth
        (
            "",
            String::new(),
            vec!["growth.from_layers=2", "growth.until_tokens=320"],
        ),
        (
            "",
            String::new(),
            vec![
                "model.num_layers=4",
                "growth.from_layers=3",
                "growth.until_tokens=320",
            ],
        ),
        (
            "",
            String::new(),
            vec![
                "model.num_layers=4",
                "growth.from_layers=0",
                "growth.until_tokens=320",
            ],
        ),
        (
            "",
            String::new(),
            vec![
                "model.num_layers=4",
                "growth.from_layers=4",
                "growth.until_tokens=320",
            ],
        ),
        (
            "",
            String::new(),
            vec![
                "model.num_layers=4",
                "growth.from_layers=2",
                "growth.until_tokens=640",
            ],
        ),
        (
            "",
            String::new(),
            vec![
                "model.num_layers=4",
                "growth.from_layers=2",
                "growth.until_tokens=0",
            ],
        ),
        (
            "",
            String::new(),
            vec![
                "model.num_layers=4",
                "growth.from_layers=2",
                "growth.until_tokens=0",
                "transfer.proxy.hidden_size=0",
            ],
        ),
        (
            "",
            String::new(),
            vec![
                "model.num_layers=4",
                "growth.from_layers=2",
                "growth.until_tokens=320",
                "growth.optimizer=fresh",
            ],
        ),
        // accepted, with overrides of many kinds
        (
            "",
            String::new(),
            vec![
                "system.device=cuda",
                "parallel.backend=nccl",
                "system.precision=bf16",
                "train.schedule=wsd",
                "moe.bias_control.mode=pid",
                "moe.bias_control.kp=0.1",
                "checkpoint.async=false",
                "launch.requeue=false",
                "output.dir=out",
                "checkpoint.dir=s3://b/c",
            ],
        ),
        (
            "",
            String::new(),
            vec![
                "model.num_layers=4",
                "growth.from_layers=2",
                "growth.until_tokens=320",
                "transfer.proxy.hidden_size=16",
                "transfer.proxy.groups.norms.lr=0.5",
                "transfer.proxy.groups.embedding={lr: 0.1, init_std: 0.3}",
            ],
        ),
        (
            data0,
            mix.to_string(),
            vec![
                "data.storage.endpoint=http://x",
                "checkpoint.storage.retries=2",
            ],
        ),
    ]
}

#[test]
fn every_message_is_unchanged() {
    let cases: Vec<Case> = [
        parse_cases(),
        model_cases(),
        data_cases(),
        later_cases(),
        transfer_cases(),
        last_cases(),
    ]
    .concat();
    let mut out = String::new();
    for (from, to, sets) in &cases {
        let text = if from.is_empty() {
            GOOD.to_string()
        } else {
            let t = GOOD.replace(from, to);
            assert_ne!(t, GOOD, "{from:?}");
            t
        };
        let result = sets
            .iter()
            .map(|s| Override::parse(s))
            .collect::<Result<Vec<_>, _>>()
            .and_then(|o| parse(&text, "r.yaml", &o));
        let shown = match result {
            Ok(_) => "OK".to_string(),
            Err(e) => e.to_string(),
        };
        out.push_str(&format!("=== {from:?} -> {to:?} {sets:?}\n{shown}\n"));
    }
    for arg in [
        "train.steps",
        "a..b=1",
        ".x=1",
        "x.=1",
        "=1",
        "train.steps=[",
        "train.steps=: :",
        " train.steps = 4 ",
        "model.num_layers=4=5",
    ] {
        let shown = match Override::parse(arg) {
            Ok(_) => "OK".to_string(),
            Err(e) => e.to_string(),
        };
        out.push_str(&format!("=== override {arg:?}\n{shown}\n"));
    }
    let e = load(std::path::Path::new("/no/such/recipe.yaml"), &[]).unwrap_err();
    out.push_str(&format!("=== load missing\n{e}\n"));
    let golden = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/recipe/testdata/messages.txt"
    );
    if std::env::var_os("RECIPE_GOLDEN_WRITE").is_some() {
        std::fs::write(golden, &out).unwrap();
    }
    let expected = std::fs::read_to_string(golden).unwrap();
    for (want, got) in expected.lines().zip(out.lines()) {
        assert_eq!(got, want, "messages differ from {golden}");
    }
    assert_eq!(out, expected, "messages differ from {golden}");
}
