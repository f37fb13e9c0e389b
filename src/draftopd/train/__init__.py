"""Training: the two plain loops (``sft``, ``opd``), over what they share: the run scaffold (``scaffold``),
checkpoints and run-folder judging (``checkpoints``), pure losses and every Draft-OPD objective (``losses``) and
Draft-OPD's rollouts and replay plans (``replay``)."""
