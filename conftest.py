"""Test-session setup: runtime shape/dtype checking of jaxtyping annotations in our packages.

Installed before any lcjax / pallas_kernels module is imported, so a wrong rank or a mismatched
dimension fails at trace time in every test (STYLE habit 1).
"""

import os

# Tests run tiny shapes, where XLA's CPU compile dominates: skip LLVM's backend optimisation
# (about 2-3x faster compiles; results are unchanged).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

from jaxtyping import install_import_hook  # noqa: E402

if os.environ.get("LCJAX_TYPECHECK", "1") != "0":
    install_import_hook(["lcjax", "pallas_kernels"], "beartype.beartype")
