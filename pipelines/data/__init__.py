"""TODO."""

from pipelines.data.errors import DataError, DataLayoutError
from pipelines.data.prepare import prepare
from pipelines.data.prepared import Prepared, place

__all__ = ["DataError", "DataLayoutError", "Prepared", "place", "prepare"]
