"""preflab.feedback."""
