#!/usr/bin/env bash
# The domain is plain data and pure functions (ARCHITECTURE.md, invariants): it depends on
# nothing that does IO and reads no clock and no randomness. Fails, naming the culprit,
# when a normal dependency of annals-domain is a runtime, a database or an HTTP crate,
# or when its source reads the time, a random number or the file system or network.
set -euo pipefail
cd "$(dirname "$0")/.."

forbidden='^(tokio|sqlx|sqlx-[a-z-]+|axum|hyper|reqwest|mio|async-trait|futures|rand|libsqlite3-sys)$'
tree=$(cargo tree -p annals-domain -e normal --prefix none --locked) \
  || { echo "domain-is-pure: cargo tree failed" >&2; exit 1; }
found=$(awk '{print $1}' <<<"$tree" | sort -u | grep -E "$forbidden" || true)
if [ -n "$found" ]; then
  echo "domain-is-pure: annals-domain depends on IO crates: $found" >&2
  exit 1
fi

reads='Utc::now|Local::now|SystemTime|Instant::now|new_v4|now_v7|thread_rng|rand::|std::fs|std::net|std::env'
if grep -rnE "$reads" domain/src; then
  echo "domain-is-pure: the domain reads a clock, randomness or the environment (above)" >&2
  exit 1
fi
echo "domain-is-pure: passed"
