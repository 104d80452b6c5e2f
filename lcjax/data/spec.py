"""The data settings live in `lcjax.config.DataConfig` (one definition); `DataSpec` names it here.

`check` raises the `data:`-prefixed ValueError the data modules use for their own validation.
"""

from lcjax.config import DATA_SOURCES as SOURCES
from lcjax.config import DataConfig as DataSpec
from lcjax.config import check_data as check

SPLITS = ("train", "heldout")

__all__ = ["SOURCES", "SPLITS", "DataSpec", "check"]
