"""Inference from an export: requests -> canvases -> `model.sampling.generate` (predictor), one request from the
command line (sample), a prompts JSONL on Ray Data (generate)."""
