"""Plumbing every layer uses, below the model: storage (local or s3://, retried), typed configs, Ray start-up
and MLflow tracking. Imports run one way: common <- model <- tokenize_jobs <- pipelines <- bench, demo."""
