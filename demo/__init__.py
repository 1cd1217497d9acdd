"""The embedded demo: a real digit corpus (images and recorded speech) through tokenization, training and
evaluation on one CPU machine. `python -m demo` (what `make demo` runs)."""
