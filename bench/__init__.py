"""Benchmarks: `python -m bench [names...]` prints one JSON object per benchmark (see bench/README.md)."""
