#!/bin/sh
# secrets-env.sh COMMAND [ARG...]: run COMMAND with the secrets given as files set as variables.
#
# For each NAME below, when NAME_FILE is set (and NAME is not: the environment wins over a file),
# NAME is set to the first line of that file. The files are docker-compose secrets (/run/secrets/...)
# or what `make secrets` wrote (secrets/...): passwords stay out of docker-compose.yml, the Makefile
# and `ps`. Used by `make server`, `make worker`, `make deploy`, `make mlflow-server` and the services
# of docker-compose.yml. (Only these names: other *_FILE variables, such as SSL_CERT_FILE, are paths.)
set -eu

NAMES="MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY MLFLOW_TRACKING_PASSWORD
       PREFECT_SERVER_API_AUTH_STRING PREFECT_API_AUTH_STRING PREFECT_SERVER_DATABASE_PASSWORD POSTGRES_PASSWORD"

for name in $NAMES; do
    file=$(printenv "${name}_FILE" || true)
    [ -n "$file" ] || continue
    unset "${name}_FILE"
    [ -z "$(printenv "$name" || true)" ] || continue
    if [ ! -r "$file" ]; then
        echo "error: ${name}_FILE=$file is not a readable file: run 'make secrets', or set $name" >&2
        exit 2
    fi
    value=$(head -n 1 "$file" | tr -d '\r\n')
    if [ -z "$value" ]; then
        echo "error: $file is empty: delete it and run 'make secrets', or set $name" >&2
        exit 2
    fi
    export "$name=$value"
done

exec "$@"
