"""runtime.compile_cache: programs compiled by one run are stored for the next; $JAX_COMPILATION_CACHE_DIR wins;
an unusable directory is one line naming the key."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rlhf_jax.errors import UserError
from rlhf_jax.runtime import compile_cache

PROGRAM = """
import sys, jax, jax.numpy as jnp
from rlhf_jax.runtime import compile_cache
compile_cache.use(sys.argv[1])
print(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).sum())
print("max size", jax.config.jax_compilation_cache_max_size)
"""


def test_a_run_stores_its_programs_in_the_cache_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["HOME"] = str(tmp_path / "home")  # `~` is the user's home, not a directory named ~
    cache = tmp_path / "home" / "nested" / "cache"
    run = lambda env: subprocess.run([sys.executable, "-c", PROGRAM, "~/nested/cache"], env=env, check=True,
                                     capture_output=True, text=True, cwd=tmp_path).stdout
    assert f"max size {compile_cache.MAX_BYTES}" in run(env)  # bounded: the least recently used programs go
    assert any(cache.iterdir())  # created, and the program is in it
    before = set(cache.iterdir())
    assert "max size 4096" in run({**env, "JAX_COMPILATION_CACHE_MAX_SIZE": "4096"})  # jax's own setting wins
    assert set(cache.iterdir()) == before  # read back, not compiled and stored again


def test_the_environment_wins_and_an_unwritable_directory_is_one_line(tmp_path, monkeypatch):
    import jax

    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    before = jax.config.jax_compilation_cache_dir
    compile_cache.use(str(tmp_path / "ours"))
    assert jax.config.jax_compilation_cache_dir == before and not (tmp_path / "ours").exists()
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"^runtime.compile_cache=.*file/cache: cannot create"):
        compile_cache.use(str(tmp_path / "file" / "cache"))
    compile_cache.use("")  # off: nothing to do
    assert jax.config.jax_compilation_cache_dir == before
