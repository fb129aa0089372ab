"""Every benchmark script runs, at its smallest, as a user runs it from a checkout (one CPU device, its peers
skipped: Tunix and TRL live in environments of their own), and writes the JSON its docstring promises. The scripts
are otherwise run by hand, so a product change that breaks one would show nowhere else."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from compile_helpers import subprocess_env

pytestmark = pytest.mark.full
ROOT = Path(__file__).resolve().parent.parent

# script: (its smallest arguments, the results' measurement that must be a positive number, as a key path)
SCRIPTS = {
    "decode.py": (["--batches", "2", "--new-tokens", "4", "--prompt", "8", "--rounds", "1", "--skip-transformers",
                   "--tunix-python", ""], ("results", 0, "ours_tokens_per_s")),
    "train.py": (["--steps", "1", "--rounds", "1", "--batch", "2", "--seq", "16", "--rm-prompts", "2", "--skip",
                  "mfu"], ("sft", "ours_tokens_per_s")),
    "ppo.py": (["--rounds", "1", "--iterations", "1", "--tunix-python", ""], ("episodes_per_s",)),
    "grpo.py": (["--rounds", "1", "--iterations", "1", "--prompts", "2", "--group", "2", "--tunix-python", ""],
                ("episodes_per_s",)),
    "dpo.py": (["--rounds", "1", "--steps", "1", "--prompts", "2", "--trl-python", ""], ("pairs_per_s",)),
    "prepare.py": (["--rows", "200", "--batch", "8", "--pipeline-batches", "2"], ("prepare_rows_per_s",)),
    "attention.py": (["--small", "--repeats", "1"], ("runs", 0, "einsum", "tokens_per_s")),
    "lora_ppo.py": (["--rounds", "1", "--iterations", "1", "--rank", "2"], ("lora", "episodes_per_s")),
    "label_server.py": (["--labelers", "2", "--rankings", "20"], ("runs", 0, "rankings_per_s")),
    "small_matmuls.py": (["--rows", "2", "--streamed-pairs", "2", "--repeats", "1"],
                         ("results", 0, "streamed", "xla", "gflops")),
}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_the_benchmark_script_runs_and_writes_its_json(script, tmp_path):
    args, measure = SCRIPTS[script]
    out = tmp_path / "result.json"
    # from another directory, as a user may run them
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)],
                          cwd=tmp_path, env=subprocess_env(devices=1), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    value = json.loads(out.read_text())
    for key in measure:
        value = value[key]
    assert isinstance(value, (int, float)) and value > 0, (script, measure, value)
