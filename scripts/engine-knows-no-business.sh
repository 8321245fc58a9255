#!/usr/bin/env bash
# The consumer engine knows no business (ARCHITECTURE.md, invariants): it depends on the
# store only, never on the domain, the commands, the consumers built on it or a client.
# Fails, naming the culprit, when annals-engine depends on another crate of the
# workspace than annals-store, on an HTTP or broker client, or names one in its source.
set -euo pipefail
cd "$(dirname "$0")/.."

forbidden='^(annals-domain|annals-commands|annals-consumers|annals-outbound|annals-api|reqwest|hyper|axum|async-nats)$'
tree=$(cargo tree -p annals-engine -e normal --prefix none --locked) \
  || { echo "engine-knows-no-business: cargo tree failed" >&2; exit 1; }
found=$(awk '{print $1}' <<<"$tree" | sort -u | grep -E "$forbidden" || true)
if [ -n "$found" ]; then
  echo "engine-knows-no-business: annals-engine depends on: $found" >&2
  exit 1
fi
if grep -rnE 'annals_(domain|commands|consumers|outbound|api)' engine/src; then
  echo "engine-knows-no-business: the engine names a crate of the business (above)" >&2
  exit 1
fi
echo "engine-knows-no-business: passed"
