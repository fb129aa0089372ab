#!/usr/bin/env bash
# One accelerator check: numerics on the GPU (fp32 parity, bf16), then decode throughput against transformers on
# the same GPU. Results go to $OUT (default ./gpu_out). Uses the machine's own jax/torch/transformers.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
python3 -c "import jax, flax, transformers, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__, jax.devices())" 2>&1 | tee -a "$OUT/env.txt"
# Single-device subset of the numerics tests (mesh tests need 8 devices).
sel="not mesh and not full_size"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_hf.py -k "$sel" 2>&1 | tail -25 | tee "$OUT/tests_highest_precision.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_model.py -k "logits_match or greedy or teacher" 2>&1 | tail -25 | tee "$OUT/tests_default_precision.txt"
# cuDNN fused attention (bf16 full passes) and the bf16 einsum, each against a float32 HIGHEST reference: max abs
# logit error over real tokens of a small random Llama (batch 4, T 256, left-padded rows), as JSON.
timeout 120 python3 -c "import sys; sys.path[:0] = ['.', 'tests']; import json, test_model; print(json.dumps(test_model.cudnn_attention_errors()))" 2>&1 | tail -5 | tee "$OUT/cudnn_attention.json"
timeout 150 python3 benchmarks/decode.py --batches 16 64 --new-tokens 64 128 --torch-device cuda --out "$OUT/decode_tiny_fp32.json" 2>&1 | grep '^{"batch' | tee "$OUT/decode_tiny.log"
timeout 300 python3 benchmarks/decode.py --model-size 1b --dtype bfloat16 --batches 16 128 --new-tokens 128 256 --repeats 2 --torch-device cuda --out "$OUT/decode_1b_bf16.json" 2>&1 | grep -E '^\{"batch|Error|error' | tee "$OUT/decode_1b.log"
