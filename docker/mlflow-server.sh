#!/bin/sh
# mlflow-server.sh [mlflow server options]: an MLflow tracking server that asks for credentials.
#
# MLflow's basic-auth app (`mlflow server --app-name basic-auth`, needs Flask-WTF): every request
# but /health needs a user's name and password (HTTP basic auth); clients set
# MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD. It needs, from the environment (or
# NAME_FILE through docker/secrets-env.sh):
#   MLFLOW_AUTH_ADMIN_PASSWORD      the admin's password when the user database is created (there is
#                                   no default; later changes go through MLflow's update-password API)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  signs the forms of the sign-up page (CSRF); the same for every worker
#   MLFLOW_AUTH_DATABASE_URI        where users and permissions live (e.g. sqlite:////data/basic_auth.db)
#   MLFLOW_AUTH_ADMIN_USERNAME      optional, default admin
# Used by `make mlflow-server` and docker-compose.yml.
set -eu

missing=""
for name in MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY MLFLOW_AUTH_DATABASE_URI; do
    [ -n "$(printenv "$name" || true)" ] || missing="$missing $name"
done
if [ -n "$missing" ]; then
    echo "error: the MLflow server with authentication needs$missing: set each (or NAME_FILE to a file" \
         "holding it; 'make secrets' writes them to secrets/)" >&2
    exit 2
fi

# MLflow reads the auth settings from an ini file: one of our own, private to this server process.
config_dir=$(mktemp -d "${TMPDIR:-/tmp}/mlflow-auth.XXXXXX")
cat > "$config_dir/basic_auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = $MLFLOW_AUTH_DATABASE_URI
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$config_dir/basic_auth.ini"

exec mlflow server --app-name basic-auth "$@"
