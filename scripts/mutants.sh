#!/usr/bin/env bash
# Mutation testing of the code where a bug loses data or answers wrongly, with
# cargo-mutants: each mutant is one small bug put into the code (a `>` made `>=`, a body
# replaced by `Ok(())`); the suite that covers that code must fail for it. A mutant the
# suite does not catch is a hole in the proof, and TESTING.md accounts for every one.
#
#   scripts/mutants.sh [--budget MINUTES] [AREA...]     (default: every area)
#   scripts/mutants.sh --list [AREA...]                 (the mutants, without running them)
#   scripts/mutants.sh --again [AREA...]                (only those not caught last time)
#
# Areas (file, the functions mutated, and the one suite that covers them):
#   store-write   store/src/batch.rs, store/src/group_commit.rs   store conformance (SQLite)
#   store-chain   store/src/chain.rs, store/src/audit.rs          store conformance (SQLite)
#   handler       CommandHandler::execute and its idempotency     commands handler tests
#   conversion    commands/src/conversion.rs                      commands handler tests
#   runner        engine/src/ (the runner, checkpoints, dead letters, generations, verify)
#                                                                   consumers runtime (SQLite)
#
# The store's shared code (batching, group commit, chain, audit) and the projection
# runner run the same on both backends (only their SQL text differs), so their mutants
# run the SQLite half of their suites (a tenth of the time: PostgreSQL's tests wait on
# real locks and leases); the commands suite runs on both.
#
# This is a developer's tool, not a CI step: a full run takes hours on two cores. It
# mutates a worktree of the committed HEAD under target/mutants/tree (never your
# checkout), whose build is kept between runs, so a second run rebuilds only what
# changed. Each area's results go to target/mutants/<area>/mutants.out (caught.txt,
# missed.txt, timeout.txt, unviable.txt), and a summary is printed at the end. With
# --budget, areas that would start after the budget is spent are left for the next run;
# --again tests only the mutants missed last time (after you add a test), found by their
# text rather than their line (a fix moves lines), and writes over that area's results.
#
# Needs PostgreSQL like the tests (README). Installs cargo-mutants when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

mutants_version=27.1.0
budget_minutes=
list=
again=
areas=()
while [ $# -gt 0 ]; do
  case $1 in
    --budget) budget_minutes=${2:?--budget needs minutes}; shift 2 ;;
    --list) list=1; shift ;;
    --again) again=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "mutants: unknown option $1" >&2; exit 2 ;;
    *) areas+=("$1"); shift ;;
  esac
done
[ ${#areas[@]} -gt 0 ] || areas=(store-write store-chain handler conversion runner)

# The filters and the suite of each area: cargo-mutants options, then `--`, then the
# test binary's arguments.
area_args() {
  case $1 in
    store-write) echo "-f store/src/batch.rs -f store/src/group_commit.rs --test-package annals-store
                       -- --test conformance -- sqlite::" ;;
    store-chain) echo "-f store/src/chain.rs -f store/src/audit.rs --test-package annals-store
                       -- --test conformance -- sqlite::" ;;
    handler) echo "-f commands/src/lib.rs
                   -F (execute|InFlight|TakenKey|replay|carried_out_elsewhere|request_hash)
                   --test-package annals-commands -- --test handler" ;;
    conversion) echo "-f commands/src/conversion.rs --test-package annals-commands -- --test handler" ;;
    runner) echo "-f engine/src/runner/mod.rs -f engine/src/runner/step.rs
                  -f engine/src/runner/register.rs -f engine/src/runner/status.rs
                  -f engine/src/checkpoint.rs -f engine/src/duty.rs
                  -f engine/src/runner/dead_letters.rs -f engine/src/runner/generations.rs
                  -f engine/src/runner/verify.rs -E (with_pause_hook|::pause|::name)
                  --test-package annals-consumers -- --test runtime -- sqlite::" ;;
    *) echo "mutants: no area '$1' (store-write, store-chain, handler, conversion, runner)" >&2; return 2 ;;
  esac
}

# How long one mutant's suite may run before it counts as hung. The runner's SQLite half
# runs in under 2 s, so 30 s is far from a slow run on a busy machine and a hang (the
# runner's loops make many) costs little; the other suites wait on PostgreSQL too.
area_timeout() {
  case $1 in
    runner) echo 30 ;;
    *) echo 120 ;;
  esac
}

for area in "${areas[@]}"; do area_args "$area" >/dev/null || exit 2; done

if [ "$(cargo mutants --version 2>/dev/null)" != "cargo-mutants $mutants_version" ]; then
  cargo install --locked cargo-mutants --version "$mutants_version"
fi

if [ -n "$list" ]; then
  for area in "${areas[@]}"; do
    read -r -a args <<<"$(area_args "$area" | tr '\n' ' ' | sed 's/ -- .*//')"
    echo "## $area"
    cargo mutants --workspace --list "${args[@]}"
  done
  exit 0
fi

# A worktree of HEAD that the mutants may change; its target/ is kept between runs.
tree=$root/target/mutants/tree
if [ -d "$tree/.git" ] || [ -f "$tree/.git" ]; then
  git -C "$tree" checkout --quiet --detach --force "$(git rev-parse HEAD)"
else
  mkdir -p "$root/target/mutants"
  git worktree add --quiet --detach "$tree" HEAD
  # Start from this checkout's build: only the workspace's own crates recompile.
  if [ -d "$root/target/debug" ]; then
    mkdir -p "$tree/target"
    cp -r "$root/target/debug" "$tree/target/debug"
  fi
fi
echo "mutants: testing $(git -C "$tree" rev-parse --short HEAD) in $tree"

started=$(date +%s)
for area in "${areas[@]}"; do
  if [ -n "$budget_minutes" ] && [ $(( $(date +%s) - started )) -ge $(( budget_minutes * 60 )) ]; then
    echo "mutants: budget spent; $area left for the next run"
    continue
  fi
  spec=$(area_args "$area" | tr '\n' ' ')
  read -r -a args <<<"${spec%% -- *}"
  read -r -a test_args <<<"${spec#* -- }"
  out=$root/target/mutants/$area
  mkdir -p "$out"
  # --again: one regex per mutant missed last time, its text without its line.
  only=()
  if [ -n "$again" ]; then
    missed=$out/mutants.out/missed.txt
    if [ ! -s "$missed" ]; then
      echo "mutants: $area missed nothing last time"
      continue
    fi
    while IFS= read -r mutant; do
      only+=(-F "$(sed 's/^[^:]*:[0-9]*:[0-9]*: //; s/[][\.*^$()+?{}|]/\\&/g; s/$/$/' <<<"$mutant")")
    done <"$missed"
  fi
  echo "mutants: $area"
  # Build the suite unmutated first, so the first mutant's build does not also pay for
  # the dependencies (a build of one package resolves features of its own).
  package=$(grep -o -- '--test-package [a-z-]*' <<<"$spec" | cut -d' ' -f2)
  build_args=()
  for arg in "${test_args[@]}"; do [ "$arg" = -- ] && break; build_args+=("$arg"); done
  (cd "$tree" && cargo test --quiet --no-run --package "$package" "${build_args[@]}")
  # --baseline skip: the suites pass on HEAD (CI proves it); the timeout is set instead
  # of measured. Mutants that hang (a loop whose exit is mutated) count as timeouts.
  (cd "$tree" && cargo mutants --workspace --in-place --baseline skip \
      --timeout "$(area_timeout "$area")" \
      --build-timeout 600 --no-shuffle --output "$out" \
      "${only[@]}" "${args[@]}" -- "${test_args[@]}") || true
done

echo
echo "area          caught  missed  timeout  unviable"
for area in "${areas[@]}"; do
  dir=$root/target/mutants/$area/mutants.out
  count() { cat "$dir/$1.txt" 2>/dev/null | wc -l; }
  printf '%-13s %6s  %6s  %7s  %8s\n' "$area" \
    "$(count caught)" "$(count missed)" "$(count timeout)" "$(count unviable)"
done
echo "missed mutants: target/mutants/<area>/mutants.out/missed.txt (TESTING.md explains each)"
[ -z "$again" ] || echo "(with --again, the counts are of the mutants run again)"
