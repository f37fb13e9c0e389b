"""Benchmarks: the side-by-side measurement of named drafters against plain decoding (``run``: tau, tokens/s,
speed-ups) and the cost of a draft and a verify step (``cost``). The evaluation prompt sets are
``data/eval_sets``."""
