"""DeepCluster: unsupervised visual features by alternating k-means and pseudo-label training.

The library is plain torch, faiss and polars; orchestration (Dagster, DVC, MLflow) wraps it from outside.
"""

import os

# OpenMP's threads (torch's, faiss's) spin on their cores between parallel regions by default,
# taking them from every other process on a shared machine; read once, before torch is imported.
# A user's own setting of either wins.
if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys():
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

__version__ = "0.1.0"
