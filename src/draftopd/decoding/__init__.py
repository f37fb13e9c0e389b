"""Speculative decoding: the accept rule (``sampling``) and the one decoding loop (``decode``)."""
