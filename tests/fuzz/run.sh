#!/usr/bin/env bash
# Fuzz the HTTP API from its own /openapi.json with schemathesis and every one of its
# checks: each operation gets generated requests, valid and invalid by the document; a
# valid one must be taken (or refused only for the state: 404, 409, 412), an invalid
# one refused with a 4xx, no answer may be a server error, and each must match the
# status codes, headers, content types and schemas the document declares.
#
#   tests/fuzz/run.sh [path/to/annals]     (default target/debug/annals; builds nothing)
#
# Runs once against a fresh SQLite file, then against a fresh PostgreSQL database
# (created at $ANNALS_TEST_DATABASE_URL's server and dropped after); when psql cannot
# reach that server the run FAILS: half a fuzz run is not a pass.
# Settings: FUZZ_MAX_EXAMPLES (30 per operation), FUZZ_SEED.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD

annals=${1:-target/debug/annals}
[[ $annals == /* ]] || annals=$root/$annals
[ -x "$annals" ] || { echo "fuzz: no annals binary at $annals (cargo build -p annals-api)" >&2; exit 2; }

schemathesis_version=4.32.5
venv=$root/target/fuzz-venv
max_examples=${FUZZ_MAX_EXAMPLES:-30}
seed=${FUZZ_SEED:-6}
admin_url=${ANNALS_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
# PostgreSQL needs a master key (ANNALS_MASTER_KEY): a fixed one for these throwaway
# databases, shared by the demo and the server.
export ANNALS_MASTER_KEY=0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0
token=fuzz-token

if [ "$("$venv/bin/st" --version 2>/dev/null)" != "st, version $schemathesis_version" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$schemathesis_version"
fi

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
  ANNALS_API_TOKENS="operator:fuzz:$token" \
    "$annals" serve --database-url "$url" --listen 127.0.0.1:0 >"$log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 100); do
    base=$(grep -o 'listening on http://127\.0\.0\.1:[0-9]*' "$log" | head -n 1 | sed 's/^listening on //') || true
    [ -n "$base" ] && return 0
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "fuzz: the server did not start:" >&2
  cat "$log" >&2
  return 1
}

stop_server() {
  local log=$1 status=0
  kill -TERM "$server_pid"
  wait "$server_pid" || status=$?
  server_pid=
  if [ "$status" -ne 0 ]; then
    echo "fuzz: the server exited with $status after SIGTERM:" >&2
    tail -n 50 "$log" >&2
    return 1
  fi
}

# Every check schemathesis has (`--checks all`). One is run in a stricter-where-it-can
# form: positive_data_acceptance becomes positive_data_acceptance_given_state
# (tests/fuzz/hooks.py), which also lets through the two refusals api.md prescribes for
# the state a valid request meets, told apart by their problem code: 412
# `version-mismatch` and 422 `idempotency-key-reused`. The read models get the default
# consistency wait (5 s): a 503 `projection-lagging` for a position the log gave out
# means a projection is stuck, and fails the run like any other server error; a
# position beyond the log's head is the client's error (422), answered at once.
checks=all
excluded=positive_data_acceptance

fuzz() {
  local name=$1 url=$2 log=$work/$1-server.log status=0
  echo "== fuzz ($name): annals demo, then schemathesis ($max_examples examples per operation, seed $seed)"
  "$annals" demo --leads 50 --database-url "$url" >"$work/$name-demo.log" 2>&1 \
    || { cat "$work/$name-demo.log" >&2; return 1; }
  start_server "$url" "$log" || return 1
  # Run from the scratch directory: schemathesis and hypothesis keep state in the cwd.
  (cd "$work" && SCHEMATHESIS_HOOKS="$root/tests/fuzz/hooks.py" timeout 150 \
    "$venv/bin/st" --config-file "$root/tests/fuzz/schemathesis.toml" run "$base/openapi.json" \
    --checks "$checks" --exclude-checks "$excluded" -H "Authorization: Bearer $token" \
    --max-examples "$max_examples" --seed "$seed" --generation-database none \
    --no-color --warnings off) || status=$?
  if [ "$status" -ne 0 ]; then
    echo "fuzz ($name): schemathesis failed ($status); the server's warnings and errors:" >&2
    sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -E ' (WARN|ERROR) ' | tail -n 40 >&2 || true
  fi
  stop_server "$log" || status=1
  return "$status"
}

failed=0
fuzz sqlite "sqlite://$work/annals.db" || failed=1

if psql -q "$admin_url" -c 'SELECT 1' >/dev/null 2>&1; then
  database=annals_fuzz_$$_$(date +%s)
  psql -q "$admin_url" -c "CREATE DATABASE $database" >/dev/null
  fuzz postgres "${admin_url%/*}/$database" || failed=1
else
  echo "fuzz (postgres): no PostgreSQL answers at $admin_url; the PostgreSQL run could not be made" >&2
  failed=1
fi
[ "$failed" -eq 0 ] || { echo "fuzz: FAILED" >&2; exit 1; }
echo "fuzz: passed"
