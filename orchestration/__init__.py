"""The Dagster code location over the deepcluster library (filled in by the orchestration work)."""
