"""Making trained models smaller: structured channel pruning (prune.py)."""
