"""Speculative decoding: the one decoding loop (``loop``), the accept rule (``sampling``), what the loop shows a
drafter and asks of it (``interface``), the cache whose slots every row keeps (``slots``) and the coloured display
of accepted tokens (``show``). Nothing here imports ``models/`` at run time: drafters and the target come in as
arguments."""
