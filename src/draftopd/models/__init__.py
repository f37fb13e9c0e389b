"""The target wrapper (``target.py``), one file per drafter architecture (``dflash.py``, ``eagle3.py``, ``pld.py``)
over what they share (``base.py``, ``layers.py``, ``vocab.py``), ``layouts.py`` above them (the table of drafter
kinds: other projects' layouts of each and what serving engines are told) and ``io.py``: the one reader and the one
writer of drafter folders."""
