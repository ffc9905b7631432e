"""preflab.data."""
