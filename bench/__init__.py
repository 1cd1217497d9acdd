"""Benchmarks: each stage of the pipeline against its bare floor, as ratios measured in one run.
`python -m bench all --quick` (what `make bench` runs)."""
