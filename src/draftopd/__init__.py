"""draftopd: train speculative-decoding drafters by on-policy distillation (Draft-OPD).

The package is laid out by concept: ``spec/`` holds the one speculative-decoding loop and its accept rule,
``models/`` the target wrapper and the drafters, ``bench/`` the benchmark, ``data/`` the prompt sets and
trajectories, ``assets`` the embedded default target and data wheels, ``config`` the frozen dataclasses every
verb is built from.
"""

__version__ = "0.1.0"


class DraftopdError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero, no traceback."""
