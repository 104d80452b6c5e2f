"""Registry: discovery, default order, interpret variants, errors that name every reason."""

import sys
import types

import jax
import pytest

from pallas_kernels.registry import Registry

_PACKAGE = "_registry_test_pkg"


@pytest.fixture
def package(monkeypatch):
    """A throwaway package with backends "fast" (kernel), "ref" and "broken" (fails to import)."""
    pkg = types.ModuleType(_PACKAGE)
    pkg.__path__ = []
    monkeypatch.setitem(sys.modules, _PACKAGE, pkg)
    for name in ("fast", "ref", "other_file"):
        module = types.ModuleType(f"{_PACKAGE}.{name}")
        module.label = name
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return _PACKAGE


def _registry(package, **kwargs):
    kwargs.setdefault("load", lambda module, interpret: (module.label, interpret))
    return Registry(package, ("fast", "broken", "ref"),
                    {"gpu": ("fast", "broken", "ref"), "tpu": ("ref",)},
                    interpret=("fast", "broken"), fallback_order=("ref",), **kwargs)


def test_discovery_names_and_interpret_variants(package):
    reg = _registry(package)
    assert reg.names == ("fast", "broken", "ref", "fast_interpret", "broken_interpret")
    assert reg.available() == ("fast", "ref", "fast_interpret")
    assert reg.get("fast") == ("fast", False)
    assert reg.get("fast_interpret") == ("fast", True)
    assert reg.get("ref") == ("ref", False)
    assert "ModuleNotFoundError" in reg.unavailable["broken"]
    assert reg.unavailable["broken_interpret"] == reg.unavailable["broken"]


def test_default_order_per_platform_skips_unavailable(package):
    reg = _registry(package)
    assert reg.default_order("gpu") == ("fast", "ref")
    assert reg.default_order("tpu") == ("ref",)
    assert reg.default_order("some_new_platform") == ("ref",)
    assert reg.default_order() == reg.default_order(jax.default_backend())


def test_module_map_builtin_and_default_load(package):
    reg = Registry(package, ("fast", "xla"), {}, modules={"fast": "other_file"},
                   builtin={"xla": "the reference"}, fallback_order=("xla",))
    assert reg.get("fast").label == "other_file"  # the module itself by default
    assert reg.get("xla") == "the reference"


def test_unknown_name_is_a_value_error_listing_the_set(package):
    reg = _registry(package)
    with pytest.raises(ValueError, match=r"implementation='cuda' is not one of \('fast', "
                                         r"'broken', 'ref', 'fast_interpret', 'broken_interpret'"):
        reg.get("cuda")
    with pytest.raises(ValueError, match="implementation='cuda'"):
        reg.select("cuda", lambda name, value: value)


def test_unavailable_is_not_implemented_with_the_import_reason(package):
    reg = _registry(package)
    for name in ("broken", "broken_interpret"):
        with pytest.raises(NotImplementedError,
                           match=rf"implementation='{name}' is not available here "
                                 rf"\(ModuleNotFoundError: .*broken.*available: \('fast'"):
            reg.select(name, lambda name, value: value)


def test_named_backend_never_falls_back(package):
    reg = _registry(package)
    calls = []

    def attempt(name, value):
        calls.append(name)
        raise NotImplementedError(f"{name} refuses")

    with pytest.raises(NotImplementedError, match="^fast_interpret refuses$"):
        reg.select("fast_interpret", attempt)
    assert calls == ["fast_interpret"]


def test_none_tries_the_order_and_returns_the_first_that_accepts(package, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    reg = _registry(package)
    calls = []

    def attempt(name, value):
        calls.append(name)
        if name == "fast":
            raise NotImplementedError("fast refuses")
        return value

    assert reg.select(None, attempt) == ("ref", False)
    assert calls == ["fast", "ref"]  # "broken" did not import: skipped
    assert reg.select(None, lambda name, value: name) == "fast"


def test_none_lists_every_backends_reason_when_all_refuse(package, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    reg = _registry(package)

    def attempt(name, value):
        raise NotImplementedError(f"{name} cannot run dtype=float16")

    with pytest.raises(NotImplementedError) as info:
        reg.select(None, attempt)
    message = str(info.value)
    assert "platform 'gpu'" in message
    assert "fast: fast cannot run dtype=float16" in message
    assert "broken: not available (ModuleNotFoundError" in message
    assert "ref: ref cannot run dtype=float16" in message
    assert message.index("fast:") < message.index("broken:") < message.index("ref:")


def test_orders_and_interpret_names_are_checked(package):
    with pytest.raises(ValueError, match=r"default order for 'gpu' names \['cudnn'\]"):
        Registry(package, ("ref",), {"gpu": ("cudnn", "ref")}, fallback_order=("ref",))
    with pytest.raises(ValueError, match=r"interpret=\['splash'\]"):
        Registry(package, ("ref",), {}, interpret=("splash",), fallback_order=("ref",))
