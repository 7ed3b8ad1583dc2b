"""Benchmarks: comparisons of methods over seeds, beside the science (the federation itself lives one level up)."""
