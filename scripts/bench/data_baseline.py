"""Baseline of `catapult bench data`: pyarrow reads the same parquet shards row group by
row group (one column), and the Python `tokenizers` package encodes the text column.
Prints one JSON object: tokens and seconds for the given format."""
import argparse
import glob
import json
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("dataset", help="directory of shard-*.parquet")
parser.add_argument("--format", choices=["text", "tokens"], required=True)
parser.add_argument("--tokenizer", help="tokenizer.json (text format)")
parser.add_argument("--threads", type=int, default=1)
args = parser.parse_args()

# tokenizers parallelizes encode_batch with rayon; match the pipeline's worker count.
os.environ["RAYON_RS_NUM_CPUS"] = str(args.threads)
os.environ["TOKENIZERS_PARALLELISM"] = "true"
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

pa.set_cpu_count(args.threads)
pa.set_io_thread_count(max(1, args.threads))
tokenizer = None
if args.format == "text":
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(args.tokenizer)

shards = sorted(glob.glob(os.path.join(args.dataset, "*.parquet")))
if not shards:
    sys.exit(f"{args.dataset}: no parquet shards")
tokens = 0
start = time.perf_counter()
for shard in shards:
    f = pq.ParquetFile(shard)
    for rg in range(f.num_row_groups):
        table = f.read_row_group(rg, columns=[args.format])
        column = table.column(0)
        if args.format == "text":
            encodings = tokenizer.encode_batch(column.to_pylist(), add_special_tokens=False)
            tokens += sum(len(e.ids) + 1 for e in encodings)  # + end of document
        else:
            flat = column.combine_chunks().flatten().to_numpy()
            tokens += len(flat) + len(column)
elapsed = time.perf_counter() - start
print(json.dumps({"tokens": tokens, "seconds": elapsed}))
