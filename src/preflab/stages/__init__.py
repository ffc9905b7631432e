"""preflab.stages."""
