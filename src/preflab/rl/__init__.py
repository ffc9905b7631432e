"""preflab.rl."""
