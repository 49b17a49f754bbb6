-- Run once by the official postgres image on an empty data volume (/docker-entrypoint-initdb.d),
-- as POSTGRES_USER, who owns both databases. tests/test_server_postgres.py runs this file against a
-- real PostgreSQL server before starting MLflow on it.
CREATE DATABASE mlflow;   -- MLflow backend store (runs, params, metrics, tags)
CREATE DATABASE optuna;   -- Optuna study storage of the scheduled sweeps (GRADSWEEP_OPTUNA_STORAGE)
