"""Model growth (LongCat-Flash report): initialise a deeper model by stacking a shallower one's layers.

A trained L-layer stack is repeated r = L' / L times ([0..L-1, 0..L-1, ...]) to fill L' layers;
every other parameter (embeddings, final norm, head, MTP) is copied unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def stack_layers(old_params: Any, new_abstract: Any) -> Any:
    """New params shaped like `new_abstract`, filled from `old_params` by stacking layers.

    Deepening needs the scanned layout (a leading layer axis under "layers") and a new depth that
    is a multiple of the old one; any other difference is a ValueError naming the parameter.
    Equal shapes copy straight through (init_from without growth).
    """
    old_flat = {_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(old_params)[0]}

    def grow(path, new):
        name = _name(path)
        if name not in old_flat:
            raise ValueError(f"growth: parameter {name!r} is missing from the init_from checkpoint")
        old = np.asarray(old_flat[name])
        if name.startswith("layers/") and old.shape[1:] == tuple(new.shape[1:]):
            if new.shape[0] % old.shape[0]:
                raise ValueError(f"growth: new depth {new.shape[0]} is not a multiple of the "
                                 f"checkpoint depth {old.shape[0]} (parameter {name!r})")
            old = np.tile(old, (new.shape[0] // old.shape[0],) + (1,) * (old.ndim - 1))
        if old.shape != tuple(new.shape):
            raise ValueError(f"growth: parameter {name!r} has shape {old.shape} in the checkpoint "
                             f"but {tuple(new.shape)} in the new model")
        return jnp.asarray(old, new.dtype)

    return jax.tree_util.tree_map_with_path(grow, new_abstract)
