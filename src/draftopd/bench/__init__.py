"""Benchmarks: evaluation prompt sets (``datasets``) and the side-by-side speed measurement (``run``)."""
