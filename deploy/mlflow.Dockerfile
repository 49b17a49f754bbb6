# The MLflow tracking server of docker-compose.yml: PostgreSQL backend store (psycopg2), artifacts
# proxied to S3/MinIO (boto3), basic-auth mode (the [auth] extra: Flask-WTF). The same MLflow as the
# project and its tests (pyproject.toml: mlflow 3.17).
FROM python:3.11-slim

RUN pip install --no-cache-dir "mlflow[auth]==3.17.2" psycopg2-binary==2.9.13 boto3==1.44.5 \
 && useradd --create-home --uid 10001 mlflow \
 && mkdir -p /var/lib/mlflow-auth && chown mlflow /var/lib/mlflow-auth

# basic-auth mode (docker-compose.auth.yml) keeps its user database here, on a volume
USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
# the command (host, port, stores, allowed hosts) is set in docker-compose.yml
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
