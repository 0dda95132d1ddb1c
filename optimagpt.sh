#!/usr/bin/env bash
# OptimaGPT in one script, for a fresh Linux machine with Python 3.11.
#   ./optimagpt.sh run      set up (venv, packages, default model, database, admin, API key) and serve
#   ./optimagpt.sh test     install what the tests need and run the whole test suite
#   ./optimagpt.sh manage   any manage.py command, with the same settings as `run`
#   ./optimagpt.sh install-service   set the gateway up as a systemd service (README, "Running it for real")
#   ./optimagpt.sh service-manage    any manage.py command against that service (its settings, as its user)
set -euo pipefail
cd "$(dirname "$0")"
# Settings from .env, if there is one (see .env.example).
if [ -f .env ]; then set -a; . ./.env; set +a; fi

VENV=${OPTIMAGPT_VENV:-.venv}
PY=$VENV/bin/python
# The default native build of llama.cpp crashes in its AMX kernels on some CPUs that report AMX;
# these flags build a portable AVX2 library instead. Set CMAKE_ARGS yourself for CUDA etc.
export CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"}

# Exact versions with their hashes (requirements/*.lock, made from requirements/*.txt): pip checks every file.
install() {
    if [ ! -x "$PY" ]; then
        python3 -m venv "$VENV"
        "$PY" -m pip install --quiet --upgrade pip
    fi
    "$PY" -m pip install --quiet --disable-pip-version-check --require-hashes -r "$1"
    "$PY" -m node_agent.default_model --dest models >/dev/null
}

# Secrets of the embedded default: made once, kept in var/ readable by this user only; so is
# everything else the product writes from here on (database, node state).
local_secrets() {
    umask 077
    export OPTIMAGPT_DATA_DIR=$(realpath -m "${OPTIMAGPT_DATA_DIR:-var}")
    mkdir -p "$OPTIMAGPT_DATA_DIR"
    ([ -s "$OPTIMAGPT_DATA_DIR/secret_key" ] || "$PY" -c 'import secrets; print(secrets.token_urlsafe(50))' >"$OPTIMAGPT_DATA_DIR/secret_key"
     [ -s "$OPTIMAGPT_DATA_DIR/node_access_key" ] || "$PY" -c 'import secrets; print(secrets.token_urlsafe(32))' >"$OPTIMAGPT_DATA_DIR/node_access_key")
    if [ -z "${SECRET_KEY:-}" ]; then export SECRET_KEY_FILE=${SECRET_KEY_FILE:-$OPTIMAGPT_DATA_DIR/secret_key}; fi
    if [ -z "${OPTIMAGPT_NODE_ACCESS_KEY:-}" ]; then
        export OPTIMAGPT_NODE_ACCESS_KEY_FILE=${OPTIMAGPT_NODE_ACCESS_KEY_FILE:-$OPTIMAGPT_DATA_DIR/node_access_key}
    fi
}

case "${1:-}" in
    run)
        shift
        install requirements/base.lock
        local_secrets
        "$PY" manage.py migrate --verbosity 0
        "$PY" manage.py bootstrap
        exec "$PY" manage.py serve "$@"
        ;;
    test)
        shift
        install requirements/test.lock
        # Browser tests drive Debian's Chromium (a test tool's own browser download does not work offline).
        if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 \
                || echo "could not install chromium; the browser tests will say so" >&2
        fi
        # The systemd units are checked with Debian's systemd-analyze (verify, and security --offline).
        if ! command -v systemd-analyze >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            (apt-get update -qq && apt-get install -y -qq systemd) >/dev/null 2>&1 \
                || echo "could not install systemd; the service unit tests will say so" >&2
        fi
        # Third-party MCP servers the tests run (exact versions and hashes from tests/mcp/package-lock.json).
        if ! command -v npm >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            (apt-get update -qq && apt-get install -y -qq nodejs npm) >/dev/null 2>&1 \
                || echo "could not install npm; the tests of npm MCP servers will say so" >&2
        fi
        if command -v npm >/dev/null 2>&1; then
            npm ci --prefix tests/mcp --no-audit --no-fund --silent || { echo "npm ci failed (above)" >&2; exit 1; }
        fi
        # Security lint of the project's packages (findings fixed, or justified by a nosec comment on the line).
        "$PY" -m bandit --quiet --configfile pyproject.toml --recursive accounts certificates chat gateway mcp_servers nodes node_agent optimagpt responses_api operations \
            || { echo "bandit found security issues (above)" >&2; exit 1; }
        # Lint (with import order) and types, as pyproject.toml configures them; either failing fails the run.
        "$PY" -m ruff check --quiet . || { echo "ruff found problems (above)" >&2; exit 1; }
        "$PY" -m mypy || { echo "mypy found type errors (above)" >&2; exit 1; }
        set +e
        "$PY" -m pytest "$@"
        status=$?
        # pytest's 5 means no test ran: that is a failure, not a pass.
        [ "$status" -eq 5 ] && { echo "no tests were collected" >&2; exit 1; }
        exit "$status"
        ;;
    install-service)
        # The gateway as a systemd service (node_agent/service.py): venv and packages now, then its user, state
        # folder, secret files, environment file, database and admin account, and the unit; never on start.
        shift
        install requirements/base.lock
        exec "$PY" -m node_agent.service gateway "$@"
        ;;
    service-manage)
        # A manage.py command against the installed gateway service: the environment file install-service wrote
        # (the database, the secret files' paths) and the service's user, who owns them.
        shift
        env_file=${OPTIMAGPT_SERVICE_ENV:-/etc/optimagpt/gateway.env}
        user=${OPTIMAGPT_SERVICE_USER:-optimagpt}
        [ -r "$env_file" ] || { echo "cannot read $env_file: run install-service first (and this as root)" >&2; exit 1; }
        set -a; . "$env_file"; set +a
        if [ "$(id -un)" = "$user" ]; then exec "$PY" manage.py "$@"; fi
        exec runuser -u "$user" -- "$PY" manage.py "$@"
        ;;
    manage)
        shift
        local_secrets
        exec "$PY" manage.py "$@"
        ;;
    *)
        echo "usage: $0 run [--host H --port P] | test [pytest args] | manage <command> | install-service [...]" \
             "| service-manage <command>" >&2
        exit 2
        ;;
esac
