"""Dataset preparation rate: 100k short K-way rankings through `rlhf_jax.data.prepare` (read, validate, group
into pairs by prompt, write TFDS array_record), and the grain pipeline's tokenized examples/s over the result.
Prints one JSON document.

  python benchmarks/prepare.py [--rows 100000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from rlhf_jax.config import DataSection  # noqa: E402
from rlhf_jax.data.pipeline import train_dataset  # noqa: E402
from rlhf_jax.data.prepare import prepare, quiet_tfds  # noqa: E402
from rlhf_jax.models.tiny import bundled_prompts  # noqa: E402
from rlhf_jax.models.tokenizer import train_tiny_tokenizer  # noqa: E402

from report import emit  # noqa: E402  benchmarks/report.py


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pipeline-batches", type=int, default=200)
    ap.add_argument("--out")
    args = ap.parse_args()
    quiet_tfds()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rankings.jsonl")
        with open(path, "w") as f:
            for i in range(args.rows):
                k = 2 + i % 4
                f.write(json.dumps({"prompt": f"Prompt number {i}: please answer briefly.",
                                    "responses": [f"Response {j} to prompt {i}." for j in range(k)],
                                    "ranks": list(range(k))}) + "\n")
        size_mb = os.path.getsize(path) / 2**20
        t0 = time.perf_counter()
        summary = prepare("jsonl_rankings", [path], os.path.join(tmp, "data"), "bench", eval_fraction=0.01)
        prepare_s = time.perf_counter() - t0

        tokenizer = train_tiny_tokenizer(bundled_prompts() * 4, 300, os.path.join(tmp, "tok"))
        spec = DataSection(dir=os.path.join(tmp, "data"), name="bench", max_prompt_tokens=32, max_response_tokens=16)
        it = iter(train_dataset(spec, "train", tokenizer, args.batch, seed=0))
        next(it)
        t0 = time.perf_counter()
        for _ in range(args.pipeline_batches):
            next(it)
        pipeline_s = time.perf_counter() - t0
    result = dict(benchmark="prepare", rows=args.rows, input_mb=round(size_mb, 1), examples=summary["examples"],
                  pairs=summary["pairs"],
                  prepare_s=round(prepare_s, 2), prepare_rows_per_s=round(args.rows / prepare_s),
                  pipeline_examples_per_s=round(args.pipeline_batches * args.batch / pipeline_s),
                  pipeline_note="single-threaded tokenization of K-way rankings (K 2..5), tiny BPE",
                  platform=platform.platform(), cpu_count=os.cpu_count())
    emit(result, args.out)


if __name__ == "__main__":
    main()
