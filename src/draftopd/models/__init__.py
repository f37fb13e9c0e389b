"""The target wrapper (``target.py``), one file per drafter architecture (``dflash.py``, ``eagle3.py``, ``pld.py``)
over what they share (``base.py``, ``layers.py``, ``vocab.py``), and ``io.py``: the table of drafter kinds, the one
reader and the one writer of drafter folders."""
