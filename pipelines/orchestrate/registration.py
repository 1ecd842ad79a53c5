"""Whose turn it is to register: runs that overlap register a model one at a time.

Kept apart from the flow (no torch) so that a node can take a turn cheaply.
"""

from __future__ import annotations

import contextlib

from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists

from pipelines import tracking

# The slot's lease: renewed by Prefect while the holder lives, so a turn may last; a holder
# killed in its turn frees the slot once the lease lapses (and the server's next sweep runs).
LEASE_SECONDS = 60  # the least the Prefect server accepts


@contextlib.contextmanager
def registration_turn(model_name: str):
    """Runs register ``model_name`` one at a time, each against the champion it actually
    finds: the home's lock orders the runs of one home, and a one-slot global concurrency
    limit on the Prefect server orders those of nodes with homes of their own that share
    the server (on a run's own local API, the runs of its home)."""
    limit = f"metadistill-registry-{model_name}"
    with tracking.registry_lock(model_name):
        with get_client(sync_client=True) as client:
            try:
                client.upsert_global_concurrency_limit_by_name(limit, 1)
            except ObjectAlreadyExists:  # another run made it a moment ago
                client.read_global_concurrency_limit_by_name(limit)
        with concurrency(limit, occupy=1, strict=True, lease_duration=LEASE_SECONDS):
            yield


def hand_move_turn(model_name: str):
    """``promote`` and ``rollback`` by hand take the same turn as a run's registration
    when a Prefect server orders the team's nodes; alone on a home, its lock is enough
    (and no local Prefect API is started for it)."""
    import os

    return registration_turn(model_name) if os.environ.get("PREFECT_API_URL") else contextlib.nullcontext()
