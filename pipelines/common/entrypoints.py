"""Module paths that must stay strings, in one place: they are handed to other processes
(``python -m``, torchrun, a Prefect deployment, a fork server), so no import sees them.
``tests/test_layout.py`` imports each one."""

CLI = "pipelines.cli"
WORKER = "pipelines.orchestrate.worker"  # the torchrun worker: python -m WORKER
FLOW = "pipelines/orchestrate/flow.py:metadistill_flow"  # a deployment's entrypoint: file:function
SHARD_READER = "pipelines.data.shards"  # preloaded by the stream reader's fork server
