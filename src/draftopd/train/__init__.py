"""Training: pure losses (``losses``), small shared helpers (``common``), and the plain loops (``sft``)."""
