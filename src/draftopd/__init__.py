"""draftopd: train speculative-decoding drafters by on-policy distillation (Draft-OPD).

The package is laid out by concept: ``decoding/`` holds the one speculative-decoding loop, its accept rule and
the drafter interface, ``models/`` the target wrapper and the drafters, ``train/`` the trainers, ``bench/`` the
benchmark, ``data/`` the prompt sets and trajectories, ``lab/`` research code the core never imports, ``assets``
the embedded default target and data wheels, ``config`` the frozen dataclasses every verb is built from and
``recipes`` their YAML loader, ``owner`` and ``atomic`` the one-owner lock and crash-safe writes, ``cli`` the verbs.
"""

__version__ = "0.1.0"


class DraftopdError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero, no traceback."""
