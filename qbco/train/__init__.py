"""Training: everything before the first step (prepare), the loop, several processes (distributed)."""
