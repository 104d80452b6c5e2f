"""Contract subclasses may name `fast_cases`: their other parametrized cases get the `slow` mark
(still run by default; `-m "not slow"` gives the quick loop)."""

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        fast = getattr(item.cls, "fast_cases", None)
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        if fast is not None and case is not None and getattr(case, "name", None) not in fast:
            item.add_marker(pytest.mark.slow)
