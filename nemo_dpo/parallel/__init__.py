"""Process groups, CPU/gloo compatibility and vocab-parallel log-probs."""
