-- The postgres image creates POSTGRES_DB (Dagster's storage) on first start; MLflow gets its own.
CREATE DATABASE mlflow;
