"""What every Pallas sparse-GEMV backend refuses the same way: a foreign config, another
platform (unless interpreted), more rows than decode, an unsupported dtype."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp


def check_backend(name: str, platform: str, config_type: type, x: Any, config: Optional[Any],
                  interpret: bool, max_rows: int, dtypes: tuple[str, ...]) -> None:
    """ValueError for a config of another backend; NotImplementedError naming the unsupported
    platform, row count or dtype of `x` [T, K]."""
    if config is not None and not isinstance(config, config_type):
        raise ValueError(f"config={config!r} must be a {name}.Config")
    current = jax.default_backend()
    if current != platform and not interpret:
        raise NotImplementedError(f"{name} runs on platform {current!r}; supported: ({platform!r},), "
                                  f"or implementation='{name}_interpret' anywhere")
    if x.shape[0] > max_rows:
        raise NotImplementedError(f"{name}: {x.shape[0]} rows; supported: <= {max_rows} (decode)")
    if jnp.dtype(x.dtype).name not in dtypes:
        raise NotImplementedError(f"{name}: x.dtype={jnp.dtype(x.dtype).name} is not supported; "
                                  f"supported: {dtypes}")
