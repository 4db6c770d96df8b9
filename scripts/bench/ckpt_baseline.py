"""Baseline of `catapult bench ckpt`: torch.save / torch.load of the same tensors (read
from the checkpoint shard catapult wrote) to the same disk. Prints JSON: bytes, seconds."""
import json
import os
import sys
import time

import torch
from safetensors.torch import load_file

shard, out = sys.argv[1], sys.argv[2]
tensors = load_file(shard)
nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
start = time.perf_counter()
torch.save(tensors, out)
with open(out, "rb+") as f:
    os.fsync(f.fileno())
save = time.perf_counter() - start
del tensors
start = time.perf_counter()
loaded = torch.load(out)
load = time.perf_counter() - start
assert sum(t.numel() * t.element_size() for t in loaded.values()) == nbytes
os.remove(out)
print(json.dumps({"bytes": nbytes, "save_s": save, "load_s": load}))
