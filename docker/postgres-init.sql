-- One PostgreSQL for the team services: the `prefect` database is POSTGRES_DB; MLflow gets its own,
-- and one for the users and permissions of its basic-auth app. Runs once, on an empty volume: on an
-- existing one, create mlflow_auth by hand (docs/security.md).
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
