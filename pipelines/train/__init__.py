"""Training: token shards -> packed batches (data), the Ray Train + FSDP2 loop (trainer), DCP checkpoints and
the export (checkpoint). `python -m pipelines.train` runs the trainer."""
