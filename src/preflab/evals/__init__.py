"""preflab.evals."""
