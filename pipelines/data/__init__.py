"""The data stage: read a source, split it, normalise it, keep it in memory or as shards.

Owns: the errors (``errors``), decoding and resizing images (``decode``), reading each
source (``readers``, ``omniglot``), the splits (``splits``), the prepared splits and their
normalisation (``prepared``), the memory cache (``memory``), stream storage (``stream``,
``shards``) and the dispatch between them (``prepare``).  Re-exports ``prepare``,
``place``, ``Prepared``, ``DataError`` and ``DataLayoutError``.
May import: ``pipelines.config`` and ``pipelines.common``.
"""

from pipelines.data.errors import DataError, DataLayoutError
from pipelines.data.prepare import prepare
from pipelines.data.prepared import Prepared, place

__all__ = ["DataError", "DataLayoutError", "Prepared", "place", "prepare"]
