"""Research code the core never imports: the GPU memory and time model (``scaling``), the scaling study's report
(``study``), the best EAGLE-3 chain length from measured step costs (``chain``), and the demo's
stage-time guess from measured CPU rates (``estimate``).

The core is what the ``draftopd`` verbs import; nothing there imports ``draftopd.lab`` (``tests/test_lab.py``
checks it). Modules here may import the core.
"""
