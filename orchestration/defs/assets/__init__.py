"""The assets: the pipeline steps, training, and curation with new images."""
