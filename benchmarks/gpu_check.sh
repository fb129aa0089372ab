#!/usr/bin/env bash
# One accelerator check, about 8 minutes on an H100 / H200, most important first (a run cut short keeps what it
# finished): the SFT step's MFU at 1B in bf16, decode throughput against transformers and the HBM roofline at
# batch 16 and 128 (1B, bf16), PPO episodes/s at the Qwen2.5-0.5B shape (bf16), then the numerics (float32 parity
# with transformers, cuDNN and einsum attention in bf16 against float32), last the 1B decode with its layers unrolled
# and with XLA's dynamic-slice fusion.
# Uses the machine's own jax / torch / transformers. At most 9 files go to $OUT (default ./gpu_out): every log in
# log.txt, each measure in its JSON.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH=. JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false
step() { echo "== $(date +%T) $*" | tee -a "$LOG"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
python3 - <<'PY' 2>&1 | tee -a "$LOG"
import flax, jax, torch, transformers
print("jax", jax.__version__, "flax", flax.__version__, "transformers", transformers.__version__,
      "torch", torch.__version__, jax.devices())
PY

step "SFT MFU, 1B bf16, 8 x 2048 tokens per step"
timeout 120 python3 benchmarks/train.py --skip sft rm --mfu-model 1b --dtype bfloat16 --mfu-batch 8 --mfu-seq 2048 \
  --mfu-steps 6 --rounds 2 --out "$OUT/train_1b_bf16.json" >/dev/null 2>>"$LOG"
step "decode, 1B bf16, batch 16 and 128, 256 new tokens, against transformers and the HBM roofline"
timeout 130 python3 benchmarks/decode.py --model-size 1b --dtype bfloat16 --batches 16 128 --new-tokens 256 \
  --rounds 2 --torch-device cuda --out "$OUT/decode_1b_bf16.json" >/dev/null 2>>"$LOG"
step "PPO, Qwen2.5-0.5B shape, bf16"
timeout 210 python3 benchmarks/ppo.py --shape qwen2.5-0.5b --rounds 2 --iterations 2 --tunix-python '' \
  --out "$OUT/ppo_qwen2.5-0.5b_bf16.json" >/dev/null 2>>"$LOG"

step "numerics: single-device model and HF tests at float32 HIGHEST precision (mesh tests need 8 devices)"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_model.py \
  tests/test_hf.py -k "not mesh and not full_size" > "$OUT/tests.txt" 2>&1
tail -5 "$OUT/tests.txt" | tee -a "$LOG"
step "cuDNN fused attention and the bf16 einsum against float32: max logit error (small Llama, 4 x 256, left-padded)"
timeout 30 python3 - <<'PY' 2>>"$LOG" | tail -1 > "$OUT/cudnn_attention.json"
import json, sys
sys.path[:0] = [".", "tests"]
import test_model
print(json.dumps(test_model.cudnn_attention_errors()))
PY
step "decode, 1B bf16, batch 128, layers unrolled: what the scanned step's per-layer weight slices cost"
timeout 90 python3 benchmarks/decode.py --model-size 1b --dtype bfloat16 --batches 128 --new-tokens 256 --rounds 2 \
  --skip-transformers --scan-layers off --out "$OUT/decode_1b_bf16_unrolled.json" >/dev/null 2>>"$LOG"
step "decode, 1B bf16, batch 128, scanned with XLA's dynamic-slice fusion (each layer's weights read in place)"
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_dynamic_slice_fusion=true" timeout 90 python3 benchmarks/decode.py \
  --model-size 1b --dtype bfloat16 --batches 128 --new-tokens 256 --rounds 2 --skip-transformers \
  --out "$OUT/decode_1b_bf16_dsfusion.json" >/dev/null 2>>"$LOG"
step "done"
