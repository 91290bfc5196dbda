"""A run on disk: its config and recipes, the run folder (the one contract between commands), its metrics log
and checkpoints. Imports qbco.model, qbco.reward and below."""
