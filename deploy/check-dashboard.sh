#!/usr/bin/env bash
# Runs every query of grafana/zoomq-dashboard.json against a real Prometheus scraping a running
# zoomq, and fails if a query is invalid PromQL or returns no series. Every query must return
# data from a daemon with its default [metrics] settings under live traffic: that is what a new
# user sees, and a panel saying "No data" there is a bug (of the dashboard or of the defaults).
#
#   zoomq demo --metrics-listen 127.0.0.1:9464 --duration 5m --keep-running &
#   deploy/check-dashboard.sh [METRICS_ADDRESS]        # default 127.0.0.1:9464
#
# Give the demo a --duration longer than this script runs (about 30 s), so that there is traffic
# (a backlog, requests to Zoom, commits) while the queries run. The script starts its own Prometheus (/usr/bin/prometheus,
# Debian package `prometheus`) on 127.0.0.1:$PROM_PORT with a temporary config and storage,
# scraping the daemon every second with job="zoomq", waits $WAIT seconds for data, runs the
# queries, prints a table of query -> series count, and stops Prometheus on exit.
#
# Dashboard variables are replaced the way Grafana would with "All" selected:
# $__rate_interval -> 1m, $__interval -> 15s, $__range -> 5m, $job/$instance -> .* (matched
# with =~).
set -euo pipefail

metrics_address=${1:-127.0.0.1:9464}
PROM_PORT=${PROM_PORT:-19090}
WAIT=${WAIT:-15}
PROMETHEUS=${PROMETHEUS:-/usr/bin/prometheus}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dashboard=${DASHBOARD:-$repo/grafana/zoomq-dashboard.json}
api=http://127.0.0.1:$PROM_PORT

for tool in curl jq "$PROMETHEUS"; do
    if ! command -v "$tool" >/dev/null; then
        echo "check-dashboard: $tool not found (apt-get install -y --no-install-recommends curl jq prometheus)" >&2
        exit 1
    fi
done

if ! curl -fsS -o /dev/null --max-time 5 "http://$metrics_address/metrics"; then
    echo "check-dashboard: nothing serves http://$metrics_address/metrics; start the daemon first, e.g." >&2
    echo "  zoomq demo --metrics-listen $metrics_address --duration 5m --keep-running &" >&2
    exit 1
fi

work=$(mktemp -d)
prometheus_pid=
cleanup() {
    if [[ -n $prometheus_pid ]] && kill -0 "$prometheus_pid" 2>/dev/null; then
        kill "$prometheus_pid" 2>/dev/null || true
        wait "$prometheus_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

cat >"$work/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: zoomq
    static_configs:
      - targets: ["$metrics_address"]
EOF

"$PROMETHEUS" --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
    --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn >"$work/prometheus.log" 2>&1 &
prometheus_pid=$!

# Wait for Prometheus to come up, then for a successful scrape.
query() { curl -fsS --max-time 10 --get --data-urlencode "query=$1" "$api/api/v1/query"; }
for _ in $(seq 1 30); do
    curl -fsS -o /dev/null --max-time 1 "$api/-/ready" 2>/dev/null && break
    if ! kill -0 "$prometheus_pid" 2>/dev/null; then
        echo "check-dashboard: Prometheus exited:" >&2
        cat "$work/prometheus.log" >&2
        exit 1
    fi
    sleep 1
done
scraped=no
for _ in $(seq 1 30); do
    if [[ $(query 'up{job="zoomq"}' 2>/dev/null | jq -r '.data.result[0].value[1] // "0"') == 1 ]]; then
        scraped=yes
        break
    fi
    sleep 1
done
if [[ $scraped != yes ]]; then
    echo "check-dashboard: Prometheus on :$PROM_PORT cannot scrape $metrics_address" >&2
    cat "$work/prometheus.log" >&2
    exit 1
fi
echo "Prometheus on :$PROM_PORT scrapes $metrics_address; collecting ${WAIT}s of data"
sleep "$WAIT"

# Every target of every panel (including panels inside collapsed rows), one JSON line each.
jq -c '[.panels[] | ., (.panels // [])[]] | .[] | select(.targets)
       | .title as $title | .targets[] | {title: $title, refId, expr}' "$dashboard" >"$work/targets"

substitute() {
    # shellcheck disable=SC2016 # the $ are Grafana's, not the shell's
    sed -E \
        -e 's/\$__rate_interval/1m/g; s/\$__interval/15s/g; s/\$__range/5m/g' \
        -e 's/(job|instance)[[:space:]]*=~?[[:space:]]*"\$\{?(job|instance)\}?"/\1=~".*"/g' \
        -e 's/\$\{?(job|instance)\}?/.*/g'
}

failed=0
n_queries=0
printf '%-8s %6s  %-40s %s\n' RESULT SERIES PANEL QUERY
while IFS= read -r line; do
    title=$(jq -r '.title' <<<"$line")
    ref=$(jq -r '.refId' <<<"$line")
    expr=$(jq -r '.expr' <<<"$line" | substitute)
    n_queries=$((n_queries + 1))
    if ! answer=$(curl -sS --max-time 10 --get --data-urlencode "query=$expr" "$api/api/v1/query"); then
        result=ERROR series=-
    elif [[ $(jq -r '.status' <<<"$answer") != success ]]; then
        result=INVALID series=-
        expr="$expr  <- $(jq -r '.error // "?"' <<<"$answer")"
    else
        series=$(jq '.data.result | length' <<<"$answer")
        if [[ $series -gt 0 ]]; then
            result=ok
        else
            result=EMPTY
        fi
    fi
    [[ $result == ok ]] || failed=$((failed + 1))
    printf '%-8s %6s  %-40s %s\n' "$result" "$series" "${title:0:37} $ref" "$expr"
done <"$work/targets"

echo
if [[ $n_queries -eq 0 ]]; then
    echo "check-dashboard: no queries found in $dashboard" >&2
    exit 1
fi
if [[ $failed -gt 0 ]]; then
    echo "check-dashboard: $failed of $n_queries queries failed (INVALID: bad PromQL; EMPTY: no data)" >&2
    exit 1
fi
echo "check-dashboard: all $n_queries queries valid and returning data"
