"""A compiled program's figures per device: its memory (`compiled.memory_analysis()`: arguments, outputs,
temporaries, the outputs aliasing donated arguments, and the total that must fit) and its FLOPs per step
(`flops.flops_per_device`)."""

from __future__ import annotations

from typing import NamedTuple

import jax

from rlhf_jax.plan.flops import flops_per_device

# A dry run never executes what it compiles: on CPU, skip the costly LLVM optimisation (the buffer assignment, and
# so every memory figure, is the same; checked in tests/test_plan.py).
CPU_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class Footprint(NamedTuple):
    """Bytes per device of a compiled program (`compiled.memory_analysis()`)."""

    arguments: int
    outputs: int
    temporaries: int
    aliased: int  # outputs written into donated arguments: counted once
    code: int

    @property
    def total(self) -> int:
        """What must fit on each device at once."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


class Measured(NamedTuple):
    footprint: Footprint
    flops: float  # per device per step
    flops_note: str  # how the FLOPs were counted


def compile_program(lowered: jax.stages.Lowered, mesh) -> jax.stages.Compiled:
    cpu = mesh.devices.flat[0].platform == "cpu"
    return lowered.compile(CPU_COMPILE_OPTIONS if cpu else None)


def footprint(compiled: jax.stages.Compiled) -> Footprint:
    m = compiled.memory_analysis()
    return Footprint(m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes, m.alias_size_in_bytes,
                     m.generated_code_size_in_bytes)


def measure(lowered: jax.stages.Lowered, mesh) -> Measured:
    compiled = compile_program(lowered, mesh)
    flops, note = flops_per_device(compiled)
    return Measured(footprint(compiled), flops, note)
