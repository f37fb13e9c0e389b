"""Data: reading prompt files (``jsonl``) and, later, target trajectories as shards."""
