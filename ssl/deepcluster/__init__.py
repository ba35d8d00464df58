"""DeepCluster: unsupervised visual features by alternating k-means and pseudo-label training.

The library is plain torch, faiss and polars; orchestration (Dagster, DVC, MLflow) wraps it from outside.
"""

__version__ = "0.1.0"
