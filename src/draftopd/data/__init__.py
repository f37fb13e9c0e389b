"""Data: the evaluation prompt sets (``eval_sets``), training prompt sources (``prompts``), jsonl reading
(``jsonl``) and target trajectories as shards (``trajectories``)."""
