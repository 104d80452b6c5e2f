"""One backend registry for every kernel dispatcher: discovery, default order, interpret variants.

A dispatcher (grouped_matmul, block_sparse_attention, paged decode, quant_matmul, sparse_gemv)
builds one `Registry` from a tuple of backend names and a platform -> order dict, kept as plain
data in its api module so adding a backend is a one-line edit. Backend `name` is the module
`<package>.<name>` (or `modules[name]`), imported under a guard: a missing optional dependency
(jax-triton, a GPU jaxlib) leaves the name known but unavailable, with the import error as its
reason. A name in `interpret` also registers "<name>_interpret": the same kernels run by an
interpreter (CPU CI runs those).

`select` runs a call: a named backend never falls back to another; `None` tries the platform's
default order and, when every backend refuses the call (NotImplementedError), raises one
NotImplementedError that lists each backend's reason.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Callable, Mapping, TypeVar

import jax

INTERPRET_SUFFIX = "_interpret"
R = TypeVar("R")


def _module_itself(module: ModuleType, interpret: bool) -> Any:
    del interpret
    return module


class Registry:
    """Backends of one dispatcher, by name.

    Args:
      package: the dispatcher's package (`__package__` of its api module).
      backends: every backend name, in the order `available()` lists them.
      default_orders: platform ("cpu", "gpu", "tpu") -> names tried by `implementation=None`;
        a platform missing here uses `fallback_order`.
      interpret: backends that also register "<name>_interpret".
      load: (module, interpret) -> the registered value (default: the module itself).
      builtin: name -> value registered without an import (e.g. a reference function).
      modules: name -> module name in `package`, where it is not the backend name.
      fallback_order: the order on a platform with no entry in `default_orders`.
    """

    def __init__(
        self,
        package: str,
        backends: tuple[str, ...],
        default_orders: Mapping[str, tuple[str, ...]],
        *,
        interpret: tuple[str, ...] = (),
        load: Callable[[ModuleType, bool], Any] = _module_itself,
        builtin: Mapping[str, Any] | None = None,
        modules: Mapping[str, str] | None = None,
        fallback_order: tuple[str, ...] = ("xla",),
    ):
        builtin = dict(builtin or {})
        modules = dict(modules or {})
        unknown_interpret = set(interpret) - set(backends)
        if unknown_interpret:
            raise ValueError(f"interpret={sorted(unknown_interpret)} are not in backends="
                             f"{backends}")
        self.names: tuple[str, ...] = tuple(backends) + tuple(
            name + INTERPRET_SUFFIX for name in interpret)
        for platform, order in {**default_orders, "<fallback>": fallback_order}.items():
            stray = [n for n in order if n not in self.names]
            if stray:
                raise ValueError(f"default order for {platform!r} names {stray}, not in "
                                 f"{self.names}")
        # Mutable on purpose: tests swap a backend for a spy with monkeypatch.setitem.
        self.orders: dict[str, tuple[str, ...]] = dict(default_orders)
        self.fallback_order = tuple(fallback_order)
        self.implementations: dict[str, Any] = {}
        self.unavailable: dict[str, str] = {}  # name -> why its import failed
        for name in backends:
            if name in builtin:
                self.implementations[name] = builtin[name]
                continue
            try:
                module = importlib.import_module(f"{package}.{modules.get(name, name)}")
            except ImportError as e:  # its optional dependency is missing
                self.unavailable[name] = f"{type(e).__name__}: {e}"
                if name in interpret:
                    self.unavailable[name + INTERPRET_SUFFIX] = self.unavailable[name]
                continue
            self.implementations[name] = load(module, False)
            if name in interpret:
                self.implementations[name + INTERPRET_SUFFIX] = load(module, True)

    def available(self) -> tuple[str, ...]:
        """Registered backends, in `names` order."""
        return tuple(n for n in self.names if n in self.implementations)

    def default_order(self, platform: str | None = None) -> tuple[str, ...]:
        """Registered backends tried by `implementation=None` on `platform` (default: jax's)."""
        return tuple(n for n in self._platform_order(platform) if n in self.implementations)

    def get(self, implementation: str) -> Any:
        """The value registered under `implementation`.

        Raises ValueError for a name outside `names`, NotImplementedError (with the import
        error) for a known backend that is not available here.
        """
        if implementation not in self.names:
            raise ValueError(f"implementation={implementation!r} is not one of {self.names} "
                             "(or None for the default)")
        if implementation not in self.implementations:
            raise NotImplementedError(
                f"implementation={implementation!r} is not available here "
                f"({self.unavailable.get(implementation, 'not registered')}); available: "
                f"{self.available()}")
        return self.implementations[implementation]

    def select(self, implementation: str | None, attempt: Callable[[str, Any], R]) -> R:
        """`attempt(name, value)` for the named backend, or the first in the default order that
        does not raise NotImplementedError.

        A named backend's NotImplementedError propagates (no fallback). With None, if every
        backend in the order refuses, one NotImplementedError lists each backend's reason
        (including those of the platform's order that failed to import).
        """
        if implementation is not None:
            return attempt(implementation, self.get(implementation))
        reasons = []
        for name in self._platform_order(None):
            if name not in self.implementations:
                reasons.append(f"{name}: not available "
                               f"({self.unavailable.get(name, 'not registered')})")
                continue
            try:
                return attempt(name, self.implementations[name])
            except NotImplementedError as e:  # this backend cannot run the case; try the next
                reasons.append(f"{name}: {e}")
        raise NotImplementedError(
            f"no backend accepts this call on platform {jax.default_backend()!r}; "
            + ("; ".join(reasons) if reasons else "the default order is empty"))

    def _platform_order(self, platform: str | None) -> tuple[str, ...]:
        platform = jax.default_backend() if platform is None else platform
        return self.orders.get(platform, self.fallback_order)
