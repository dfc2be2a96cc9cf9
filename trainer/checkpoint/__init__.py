"""The checkpoint engine: DCP checkpoints on a shared volume that any world size resumes from.
``manager.CheckpointManager`` is the one object the worker talks to; below it, the save policy and
interval, staging into shared host memory, a writer process per rank, storage writers that digest
every byte and commit last (``commit.json``), the resume that verifies while it reads, retention
and the job lock. Its own README maps the modules."""
