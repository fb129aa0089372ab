"""FLOPs of one step on one device. `compiled.cost_analysis()` counts the partitioned program of ONE device but
counts the body of a while loop once; the matmul FLOPs of loop bodies (gradient accumulation, the sampler, PPO's
epochs and minibatches) are therefore recounted from the compiled HLO text with each loop's known trip count. A
loop that may stop early (the sampler's decode, which ends when every response has) may have none: it is counted
at the most trips its name gives (`rlhf_jax.runtime.loops.bounded_while_loop`), and any other such loop once."""

from __future__ import annotations

import math
import re

import jax

from rlhf_jax.runtime.loops import MOST_TRIPS

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_ARRAY = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*\w+\[([\d,]*)\]\S*\s+([\w\-]+)\((.*)$")
_CALLEE = re.compile(r"\b(calls|to_apply|body|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
# A matmul XLA's GPU compiler handed to cuBLAS / cuBLASLt: a custom-call whose output is its result (or a tuple of
# it and a workspace), its contracting dimensions in the backend config.
_GEMM = re.compile(r'^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*\(?\w+\[([\d,]*)\].*?\scustom-call\('
                   r'(?:\w+\[([\d,]*)\]\S*\s+)?%([\w.\-]+).*custom_call_target="__cublas\$(?:gemm|lt\$matmul)')
_GEMM_CONTRACTING = re.compile(r'lhs_contracting_dimensions\\?":\[([^\]]*)\]')


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def hlo_matmul_flops(hlo_text: str) -> tuple[float, float, int]:
    """(matmul FLOPs with every while loop's body counted by its known trip count, or the most trips its name
    gives, or once, the same with each body counted once as XLA's cost analysis counts it, loops counted once for
    want of a trip count) of a compiled module's HLO text. A dot's FLOPs, or a cuBLAS gemm's (a GPU's dots, after
    XLA's rewrite): 2 x its output elements x its contracted elements."""
    shapes: dict[str, list[int]] = {}
    own: dict[str, float] = {}
    calls: dict[str, list[tuple[str, int]]] = {}
    unknown, comp, entry = 0, None, None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head and not line.startswith(" "):
            comp = head.group(1)
            entry = comp if line.startswith("ENTRY") else entry
            own.setdefault(comp, 0.0)
            calls.setdefault(comp, [])
            continue
        if comp is None:
            continue
        gemm = _GEMM.match(line)
        if gemm:  # its lhs' shape written beside it, or recorded where it was defined
            out, lhs_dims, lhs = gemm.groups()
            lhs_shape = _dims(lhs_dims) if lhs_dims is not None else shapes.get(lhs)
            contracting = _GEMM_CONTRACTING.search(line)
            if lhs_shape is not None and contracting:
                k = math.prod(lhs_shape[int(d)] for d in re.findall(r"\d+", contracting.group(1)))
                own[comp] += 2.0 * math.prod(_dims(out)) * k
        array = _ARRAY.match(line)
        if array:
            name, dims, op, rest = array.groups()
            shapes[name] = _dims(dims)
            if op == "dot":
                lhs = re.match(r"\s*(?:\w+\[[\d,]*\]\S*\s+)?%([\w.\-]+)", rest)
                contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
                if lhs and contracting and lhs.group(1) in shapes:
                    k = math.prod(shapes[lhs.group(1)][d] for d in _dims(contracting.group(1)))
                    own[comp] += 2.0 * math.prod(shapes[name]) * k
        trip = 1
        if " while(" in line:
            found = _TRIP.search(line) or MOST_TRIPS.search(line)
            trip = int(found.group(1)) if found else 1
            unknown += found is None
        for kind, callee in _CALLEE.findall(line):
            calls[comp].append((callee, trip if kind == "body" else 1))
        for branches in _BRANCHES.findall(line):
            calls[comp] += [(b.strip().lstrip("%"), 1) for b in branches.split(",") if b.strip()]

    def total(name: str, with_trips: bool, memo: dict) -> float:
        if name not in memo:
            memo[name] = own.get(name, 0.0) + sum((n if with_trips else 1) * total(callee, with_trips, memo)
                                                  for callee, n in calls.get(name, []))
        return memo[name]

    if entry is None:
        return 0.0, 0.0, unknown
    return total(entry, True, {}), total(entry, False, {}), unknown  # recursion as deep as the calls nest


def flops_per_device(compiled: jax.stages.Compiled) -> tuple[float, str]:
    """FLOPs of one step on one device: XLA's cost analysis of the partitioned (per-device) program, with the
    matmuls of loop bodies counted as many times as the loops run (at their most trips, for one that may stop
    early)."""
    costs = compiled.cost_analysis()
    costs = costs[0] if isinstance(costs, (list, tuple)) else costs
    xla = float((costs or {}).get("flops", 0.0))
    with_trips, once, unknown = hlo_matmul_flops(compiled.as_text() or "")
    if with_trips == once == 0.0:
        return xla, "loop bodies counted once"
    note = "the matmuls of loop bodies counted once per trip"
    if unknown:
        note += f"; {unknown} loop(s) of no known or named trip count counted once"
    return xla + with_trips - once, note
