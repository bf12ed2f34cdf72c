"""Benchmarks: ratios measured in the same run, printed as a JSON last line."""
