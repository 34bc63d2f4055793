-- One PostgreSQL for the team services: the `prefect` database is POSTGRES_DB; MLflow gets its own.
CREATE DATABASE mlflow;
