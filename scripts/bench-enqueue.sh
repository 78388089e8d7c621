#!/usr/bin/env bash
# Benchmark 1 of BENCHMARKS.md ("Durable enqueue"): zoomq's durable intake (benches/enqueue.rs)
# against Redis with `appendfsync always` on the same filesystem, then a comparison table.
#
#   scripts/bench-enqueue.sh [--dir DIR] [bench flags such as --seconds 10 --window 32]
#
# --dir (default: $TMPDIR or /tmp) holds both zoomq's and Redis's data directories, so both write
# to the same filesystem. Other flags go to the bench (`cargo bench --bench enqueue -- --help`).
# Installs redis-server with apt-get if redis-server or redis-benchmark is missing (Debian, root).
# Environment: REDIS_PORT (16379), REDIS_N (300000), REDIS_SINGLE_N (30000), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

dir="${TMPDIR:-/tmp}"
bench_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) dir="$2"; shift 2 ;;
        --dir=*) dir="${1#--dir=}"; shift ;;
        *) bench_args+=("$1"); shift ;;
    esac
done
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
redis_port="${REDIS_PORT:-16379}"
redis_n="${REDIS_N:-300000}"
redis_single_n="${REDIS_SINGLE_N:-30000}"

section() { printf '\n== %s\n' "$*"; }

section "machine"
echo "cores:      $(nproc)"
echo "cpu:        $(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -n1)"
echo "memory:     $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
echo "kernel:     $(uname -r)"
echo "data dir:   $dir"
df -T "$dir" | sed 's/^/            /'
echo "load avg:   $(cut -d' ' -f1-3 /proc/loadavg) (1, 5, 15 min; figures are noisy if well above 0)"

if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
    section "installing redis-server"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y redis-server >/dev/null 2>&1 \
        || { apt-get update >/dev/null && apt-get install -y redis-server >/dev/null; }
fi
echo "redis:      $(redis-server --version)"

work="$(mktemp -d "$dir/bench-enqueue-XXXXXX")"
redis_pid=""
cleanup() {
    if [ -n "$redis_pid" ]; then
        kill "$redis_pid" 2>/dev/null || true
        wait "$redis_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# The disk's state right now: shared machines vary a lot from one minute to the next, so every
# phase is preceded by this, to tell a slow system from a slow disk moment.
disk_probe() {
    local start end
    start=$(date +%s%N)
    dd if=/dev/zero of="$work/probe" bs=4k count=200 oflag=dsync status=none
    end=$(date +%s%N)
    rm -f "$work/probe"
    echo "disk probe: $(( (end - start) / 200000 )) us per 4 KiB O_DSYNC write (mean of 200); load avg $(cut -d' ' -f1 /proc/loadavg)"
}

# ---- zoomq --------------------------------------------------------------------------------------
zoomq_cmd=(cargo bench --bench enqueue -- --dir "$dir" "${bench_args[@]}")
section "zoomq: ${zoomq_cmd[*]}"
cargo bench --bench enqueue --no-run 2>&1 | grep -v '^ *Compiling' || true
disk_probe
"${zoomq_cmd[@]}" 2>&1 | grep -v '^ *\(Compiling\|Finished\|Running\)' | tee "$work/zoomq.out"
zoomq_json="$(grep '^{"bench":"enqueue"' "$work/zoomq.out" | tail -n1)"
[ -n "$zoomq_json" ] || { echo "the zoomq bench printed no JSON line" >&2; exit 1; }

# zoomq RUN KEY: a number from the run's object in the bench's JSON line (the objects are flat).
zoomq() {
    printf '%s\n' "$zoomq_json" | tr '{}' '\n\n' | grep "\"run\":\"$1\"" \
        | grep -o "\"$2\":[0-9.e+-]*" | head -n1 | cut -d: -f2
}

# ---- Redis --------------------------------------------------------------------------------------
redis_cmd=(redis-server --port "$redis_port" --appendonly yes --appendfsync always --save ''
    --dir "$work")
section "redis: $(printf '%q ' "${redis_cmd[@]}")"
"${redis_cmd[@]}" --logfile "$work/redis.log" &
redis_pid=$!
for _ in $(seq 100); do
    redis-cli -p "$redis_port" ping 2>/dev/null | grep -q PONG && break
    sleep 0.1
done
redis-cli -p "$redis_port" ping | grep -q PONG || { echo "redis did not start" >&2; exit 1; }

redis_multi_cmd=(redis-benchmark -p "$redis_port" -t lpush -d 1024 -c 64 -n "$redis_n" -P 1 --csv)
redis_single_cmd=(redis-benchmark -p "$redis_port" -t lpush -d 1024 -c 1 -n "$redis_single_n" -P 1 --csv)
disk_probe
echo "\$ ${redis_multi_cmd[*]}"
"${redis_multi_cmd[@]}" 2>/dev/null | grep '^"' | tee "$work/redis-multi.csv"
disk_probe
echo "\$ ${redis_single_cmd[*]}"
"${redis_single_cmd[@]}" 2>/dev/null | grep '^"' | tee "$work/redis-single.csv"
kill "$redis_pid"
wait "$redis_pid" 2>/dev/null || true
redis_pid=""

# redis FILE COLUMN: a column of the LPUSH row of a redis-benchmark CSV, by header name; "-" if
# this redis-benchmark does not report it.
redis() {
    awk -F'","' -v col="$2" '
        { gsub(/^"|"$/, "") }
        NR == 1 { for (i = 1; i <= NF; i++) if ($i == col) c = i; next }
        $1 == "LPUSH" { print (c ? $c : "-"); exit }
    ' "$1"
}

# ---- comparison ---------------------------------------------------------------------------------
ms() { awk -v us="$1" 'BEGIN { printf "%.3f", us / 1000 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 > 0 && a != "-") printf "%.2f", a / b; else printf "-" }'; }
rate() { awk -v r="$1" 'BEGIN { printf "%.0f", r }'; }

w32_rate=$(rate "$(zoomq pipelined rate)")
w32_p50=$(ms "$(zoomq pipelined p50_us)")
w32_p99=$(ms "$(zoomq pipelined p99_us)")
w1_rate=$(rate "$(zoomq window1 rate)")
w1_p50=$(ms "$(zoomq window1 p50_us)")
w1_p99=$(ms "$(zoomq window1 p99_us)")
single_rate=$(rate "$(zoomq single rate)")
single_p50=$(ms "$(zoomq single p50_us)")
r_rate=$(rate "$(redis "$work/redis-multi.csv" rps)")
r_p50=$(redis "$work/redis-multi.csv" p50_latency_ms)
r_p99=$(redis "$work/redis-multi.csv" p99_latency_ms)
rs_rate=$(rate "$(redis "$work/redis-single.csv" rps)")
rs_p50=$(redis "$work/redis-single.csv" p50_latency_ms)
window=$(zoomq pipelined window)

section "zoomq vs Redis (appendfsync always), 1 KiB payloads, durable acknowledgements"
row() { printf '%-18s %16s %16s %16s %12s %12s\n' "$@"; }
row "" "zoomq window $window" "zoomq window 1" "redis -P 1" "w1/redis" "w$window/redis"
row "64 conns, acks/s" "$w32_rate" "$w1_rate" "$r_rate" "$(ratio "$w1_rate" "$r_rate")" "$(ratio "$w32_rate" "$r_rate")"
row "64 conns, p50 ms" "$w32_p50" "$w1_p50" "$r_p50" "$(ratio "$w1_p50" "$r_p50")" "$(ratio "$w32_p50" "$r_p50")"
row "64 conns, p99 ms" "$w32_p99" "$w1_p99" "$r_p99" "$(ratio "$w1_p99" "$r_p99")" "$(ratio "$w32_p99" "$r_p99")"
row "1 conn, acks/s" "-" "$single_rate" "$rs_rate" "$(ratio "$single_rate" "$rs_rate")" "-"
row "1 conn, p50 ms" "-" "$single_p50" "$rs_p50" "$(ratio "$single_p50" "$rs_p50")" "-"
echo "(zoomq: Unix socket, newline-delimited JSON, 1 KiB JSON content per edit, distinct message"
echo " ids; redis: TCP loopback, LPUSH of a 1024-byte value; ratios are zoomq / redis, so above 1"
echo " is better for acks/s and worse for latency)"
echo "load avg after: $(cut -d' ' -f1-3 /proc/loadavg)"
