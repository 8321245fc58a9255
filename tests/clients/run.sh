#!/usr/bin/env bash
# Clients generated from the served OpenAPI document, as a new user would make them:
#   - openapi-python-client (pinned, in a virtual environment under target/) and
#     openapi-typescript (pinned in tests/clients/package-lock.json, installed by npm ci)
#     must both generate from /openapi.json without a single warning or skipped
#     operation;
#   - then tests/clients/smoke.py drives the running server through the generated
#     Python client: one call of every operation the document has, each answer parsed
#     into its typed model, and one error parsed as a problem. An operation of the
#     document without a smoke call fails the run.
#
#   tests/clients/run.sh [path/to/annals]     (default target/debug/annals; builds nothing)
#
# Runs against a fresh SQLite file, then a fresh PostgreSQL database (created at
# $ANNALS_TEST_DATABASE_URL's server and dropped after); when psql cannot reach that
# server the run FAILS.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD

annals=${1:-target/debug/annals}
[[ $annals == /* ]] || annals=$root/$annals
[ -x "$annals" ] || { echo "clients: no annals binary at $annals (cargo build -p annals-api)" >&2; exit 2; }

python_generator_version=0.29.1
venv=$root/target/clients-venv
admin_url=${ANNALS_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
# PostgreSQL needs a master key (ANNALS_MASTER_KEY): a fixed one for these throwaway
# databases, shared by the demo and the server.
export ANNALS_MASTER_KEY=0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0
token=clients-token

if [ "$("$venv/bin/openapi-python-client" --version 2>/dev/null)" != "openapi-python-client version: $python_generator_version" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "openapi-python-client==$python_generator_version"
fi
(cd tests/clients && npm ci --no-audit --no-fund --loglevel=error >/dev/null)

work=$(mktemp -d)
server_pid=
database=
cleanup() {
  if [ -n "$server_pid" ]; then kill -TERM "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  if [ -n "$database" ]; then psql -q "$admin_url" -c "DROP DATABASE IF EXISTS $database WITH (FORCE)" >/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# Starts the server on a free loopback port and waits until it says where it listens.
start_server() {
  local url=$1 log=$2
  ANNALS_API_TOKENS="operator:clients:$token" \
    "$annals" serve --database-url "$url" --listen 127.0.0.1:0 >"$log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 100); do
    base=$(grep -o 'listening on http://127\.0\.0\.1:[0-9]*' "$log" | head -n 1 | sed 's/^listening on //') || true
    [ -n "$base" ] && return 0
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "clients: the server did not start:" >&2
  cat "$log" >&2
  return 1
}

stop_server() {
  local log=$1 status=0
  kill -TERM "$server_pid"
  wait "$server_pid" || status=$?
  server_pid=
  if [ "$status" -ne 0 ]; then
    echo "clients: the server exited with $status after SIGTERM:" >&2
    tail -n 50 "$log" >&2
    return 1
  fi
}

# Runs a generator; any line that warns, or says it skipped something, fails it.
generate() {
  local name=$1 out=$2
  shift 2
  if ! "$@" >"$out" 2>&1; then
    echo "clients: $name failed:" >&2
    cat "$out" >&2
    return 1
  fi
  if grep -iE 'warn|skip|will not be generated|conflict|error' "$out" >&2; then
    echo "clients: $name warned (above); the document must generate cleanly" >&2
    return 1
  fi
}

check() {
  local name=$1 url=$2 log=$work/$1-server.log dir=$work/$1
  echo "== clients ($name)"
  mkdir -p "$dir"
  start_server "$url" "$log" || return 1
  curl -sf "$base/openapi.json" -o "$dir/openapi.json"
  # ruff, which formats the generated code, comes with the generator in its venv.
  PATH="$venv/bin:$PATH" generate openapi-python-client "$dir/python.log" \
    openapi-python-client generate --path "$dir/openapi.json" --output-path "$dir/annals_client" \
    --meta none --overwrite || { stop_server "$log"; return 1; }
  generate openapi-typescript "$dir/typescript.log" \
    "$root/tests/clients/node_modules/.bin/openapi-typescript" "$dir/openapi.json" \
    -o "$dir/annals.d.ts" || { stop_server "$log"; return 1; }
  local status=0
  PYTHONPATH="$dir" "$venv/bin/python" "$root/tests/clients/smoke.py" \
    --base-url "$base" --token "$token" --document "$dir/openapi.json" || status=$?
  if [ "$status" -ne 0 ]; then
    echo "clients ($name): the smoke run failed; the server's warnings and errors:" >&2
    sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -E ' (WARN|ERROR) ' | tail -n 40 >&2 || true
  fi
  stop_server "$log" || status=1
  return "$status"
}

failed=0
check sqlite "sqlite://$work/annals.db" || failed=1

if psql -q "$admin_url" -c 'SELECT 1' >/dev/null 2>&1; then
  database=annals_clients_$$_$(date +%s)
  psql -q "$admin_url" -c "CREATE DATABASE $database" >/dev/null
  check postgres "${admin_url%/*}/$database" || failed=1
else
  echo "clients (postgres): no PostgreSQL answers at $admin_url; the PostgreSQL run could not be made" >&2
  failed=1
fi
[ "$failed" -eq 0 ] || { echo "clients: FAILED" >&2; exit 1; }
echo "clients: passed"
