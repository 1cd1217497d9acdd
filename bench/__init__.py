"""Benchmarks: each stage of the pipeline against its bare floor, as ratios measured in one run.
`python -m bench all --quick` (what `make bench` runs).

    common.py    sizes (Plan), statistics of side-by-side repeats, host facts, the Suite (one Ray, shared set-ups)
    tokenize.py  Ray Data tokenize job vs a single-process loop over the same tokenizers
    read.py      the trainer's data path vs raw tar reading, and vs what training consumes
    train.py     Ray Train FSDP2 vs the trainer's train_step on the plain module in one process
    sample.py    a denoising step vs one plain forward; MAGVIT-v2 encoding
    fsdp.py      the trainer's FSDP2 step vs the same step on the plain module, one device, no Ray
    report.py    the result table (text and Markdown)
    cli.py       `omnidiff bench`: run_benches, the parser, main
"""
