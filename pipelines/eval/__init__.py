"""Evaluation: per-task metrics over held-out items (evaluate) and the scorers they use (scoring).
`python -m pipelines.eval` runs the evaluation."""
