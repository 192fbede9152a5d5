#!/bin/bash
# Cold start, measured: from `git clone` of this repository to the first answer of `make run`, as on a fresh
# machine (an empty HOME: no pip cache, no llama.cpp wheel). Prints the seconds; logs in $WORK.
# Usage: scripts/cold_start.sh   (uses the default ports, 8080 and 50051: nothing else may hold them)
set -euo pipefail
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
WORK=$(mktemp -d)
mkdir -p "$WORK/home"
started=$(date +%s.%N)
git clone -q "$repo" "$WORK/clone"
cd "$WORK/clone"
HOME="$WORK/home" setsid make run > "$WORK/make-run.log" 2>&1 &
runner=$!
trap 'kill -- -$runner 2>/dev/null || true' EXIT
body='{"model":"smollm2-135m-instruct","messages":[{"role":"user","content":"Say hi"}],"max_tokens":8}'
until curl -sf -m 60 http://127.0.0.1:8080/v1/chat/completions -H 'content-type: application/json' -d "$body" \
    > "$WORK/answer.json" 2>/dev/null; do
  kill -0 $runner 2>/dev/null || { tail -20 "$WORK/make-run.log"; exit 1; }
  sleep 1
done
echo "git clone to the first answer of make run: $(echo "$(date +%s.%N) - $started" | bc) s (logs in $WORK)"
