"""The two layouts of a transformer's layer params. Checkpoints, HF weights and PEFT adapters hold one subtree per
layer (`layer_0`, `layer_1`, ...); a scanned stack (`Transformer.scan_layers`) holds one subtree `layers` whose
every leaf has a leading axis of n_layers. A model reads params in its own layout; `in_layout` converts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

STACKED = "layers"


def layer_name(i: int) -> str:
    return f"layer_{i}"


def is_stacked(params: dict) -> bool:
    return STACKED in params


def stack_layers(params: dict, n_layers: int) -> dict:
    """`layer_<i>` subtrees -> one `layers` subtree stacked on a new leading axis (numpy stays numpy)."""
    if is_stacked(params) or layer_name(0) not in params:
        return params
    layers = [params[layer_name(i)] for i in range(n_layers)]
    stack = lambda *xs: np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs)
    out = {k: v for k, v in params.items() if not k.startswith("layer_")}
    out[STACKED] = jax.tree.map(stack, *layers)
    return out


def unstack_layers(params: dict) -> dict:
    """A `layers` subtree -> one `layer_<i>` subtree per index of its leading axis; other params as they are."""
    if not is_stacked(params):
        return params
    stacked = params[STACKED]
    n_layers = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in params.items() if k != STACKED}
    for i in range(n_layers):
        out[layer_name(i)] = jax.tree.map(lambda x: x[i], stacked)
    return out


def in_layout(params: dict, scanned: bool, n_layers: int) -> dict:
    """`params` in the layout of a model that scans its layers (`scanned`) or not."""
    return stack_layers(params, n_layers) if scanned else unstack_layers(params)
