"""Oracle side of the sharded-export test.

Loads two exported model directories with transformers' LongcatFlashForCausalLM (fp32,
eager attention): one a sharded export (model-0000N-of-0000M.safetensors + index), the
other the single-file export of the same weights, whose logits equal catapult's (the
parity test checks that). Usage: hf_same.py SHARDED_DIR SINGLE_DIR TOLERANCE
Prints the max absolute logit difference and the number of weight files; exits 1 when
loading reports any missing, unexpected or mismatched key, when any tensor differs, or
when the logits differ by more than TOLERANCE.
"""
import json
import sys

import torch
from transformers import LongcatFlashForCausalLM


def load(path):
    model, info = LongcatFlashForCausalLM.from_pretrained(
        path, output_loading_info=True, dtype=torch.float32, attn_implementation="eager"
    )
    bad = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise SystemExit(f"{path}: loading reported problems: {info}")
    return model


def main():
    sharded_dir, single_dir, tolerance = sys.argv[1], sys.argv[2], float(sys.argv[3])
    files = set(json.load(open(f"{sharded_dir}/model.safetensors.index.json"))["weight_map"].values())
    sharded, single = load(sharded_dir), load(single_dir)
    a, b = sharded.state_dict(), single.state_dict()
    differ = [k for k in b if k not in a or not torch.equal(a[k], b[k])]
    if differ:
        print(f"tensors differ: {differ[:5]}")
        return 1
    torch.manual_seed(0)
    tokens = torch.randint(0, 257, (2, 24))
    with torch.no_grad():
        diff = (sharded(input_ids=tokens).logits - single(input_ids=tokens).logits).abs().max().item()
    print(json.dumps({"max_abs_diff": diff, "files": len(files), "tensors": len(a)}))
    return 0 if diff <= tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
