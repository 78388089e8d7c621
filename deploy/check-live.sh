#!/usr/bin/env bash
# Live checks of a running daemon, as an operator's tools see it: starts `zoomq demo` with its
# metrics endpoint, then
#   - /healthz and /readyz answer,
#   - `promtool check metrics` reports nothing on the live /metrics output,
#   - every query of the Grafana dashboard runs through a real Prometheus and returns data
#     (deploy/check-dashboard.sh),
#   - `zoomq stats` shows the per-account rows (limit, allowed, delivered).
# The demo's daemon runs with the default configuration apart from the sandbox's address and
# credentials, temporary paths, shorter retry delays and metrics.listen: in particular the
# default metrics.per_account_series, so the dashboard is checked as a new user sees it.
# Usage: deploy/check-live.sh [ZOOMQ_BINARY]   (default target/debug/zoomq, as built by cargo test)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${1:-$repo/target/debug/zoomq}
address=${METRICS_ADDRESS:-127.0.0.1:19464}

for tool in curl jq promtool prometheus; do
    if ! command -v "$tool" >/dev/null; then
        apt-get update -qq && apt-get install -y -qq --no-install-recommends curl jq prometheus >/dev/null
        break
    fi
done
[[ -x $bin ]] || { echo "check-live: $bin not built (run cargo build or cargo test first)" >&2; exit 1; }

log=$(mktemp)
# The producer keeps editing until this script stops the demo, so the dashboard's queries all run
# under live traffic.
"$bin" demo --metrics-listen "$address" --duration 10m --keep-running </dev/null >"$log" 2>&1 &
demo=$!
cleanup() {
    # SIGTERM: a background job of a non-interactive shell starts with SIGINT ignored.
    kill -TERM "$demo" 2>/dev/null || true
    wait "$demo" 2>/dev/null || true
    rm -f "$log"
}
trap cleanup EXIT

fail() { echo "check-live: FAIL: $*" >&2; cat "$log" >&2; exit 1; }
# The HTTP endpoint answers from the start; /readyz says 503 until the queue is open and the
# socket bound, as a load balancer or systemd's readiness probe would see it.
for _ in $(seq 1 150); do
    curl -fsS -o /dev/null --max-time 1 "http://$address/healthz" 2>/dev/null && break
    sleep 0.2
done
curl -fsS "http://$address/healthz" >/dev/null || fail "/healthz"
for _ in $(seq 1 150); do
    curl -fsS -o /dev/null --max-time 1 "http://$address/readyz" 2>/dev/null && break
    sleep 0.2
done
curl -fsS "http://$address/readyz" >/dev/null || fail "/readyz (not ready after 30 s)"
sleep 3
problems=$(curl -fsS "http://$address/metrics" | promtool check metrics 2>&1) || fail "promtool check metrics: $problems"
[[ -z $problems ]] || fail "promtool check metrics: $problems"
echo "ok:   /healthz, /readyz, promtool check metrics"
"$repo/deploy/check-dashboard.sh" "$address" || fail "dashboard queries (above)"

# The demo's first line names the daemon's socket.
socket=$(sed -n 's/.*daemon socket \(.*\)$/\1/p' "$log" | head -n 1)
[[ -S $socket ]] || fail "no daemon socket in the demo's output"
stats=$("$bin" stats --socket "$socket" --json) || fail "zoomq stats"
rows=$(jq '.per_account | length' <<<"$stats")
[[ $rows -gt 0 ]] || fail "zoomq stats shows no per-account rows: $stats"
echo
"$bin" stats --socket "$socket"
echo "ok:   zoomq stats shows $rows per-account row(s)"
