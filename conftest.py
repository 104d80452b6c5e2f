"""Test-session setup: runtime shape/dtype checking of jaxtyping annotations in our packages.

Installed before any lcjax / pallas_kernels module is imported, so a wrong rank or a mismatched
dimension fails at trace time in every test (STYLE habit 1).
"""

import os

from jaxtyping import install_import_hook

if os.environ.get("LCJAX_TYPECHECK", "1") != "0":
    install_import_hook(["lcjax", "pallas_kernels"], "beartype.beartype")
