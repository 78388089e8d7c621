#!/usr/bin/env bash
# Benchmark 1 of BENCHMARKS.md ("Durable enqueue"): zoomq's durable intake (benches/enqueue/)
# against Redis with `appendfsync always` on the same filesystem, then one line per target with
# the measured value, its anchor from the same run and whether it is met:
#
#   pipelined (64 connections x 4 outstanding): >= 1.0x Redis's 64-connection rate, >= 60,000/s
#   window1   (64 connections x 1 outstanding): >= 0.8x Redis's 64-connection rate, p99 < 5 ms
#   single    (1 connection, one at a time):    p50 < 0.3 ms; anchor: one fdatasync in the same
#             directory after a 4 KiB append, and after a 4 KiB overwrite (p50s of the bench's
#             disk probe just before that run)
#
# Each zoomq line also gives the daemon's CPU time per acknowledged edit (see benches/enqueue/report.rs).
#
#   scripts/bench-enqueue.sh [--dir DIR] [bench flags such as --seconds 10 --window 4]
#
# --dir (default: $TMPDIR or /tmp) holds both zoomq's and Redis's data directories, so both write
# to the same filesystem. Other flags go to the bench (`cargo bench --bench enqueue -- --help`).
# Installs redis-server with apt-get if redis-server or redis-benchmark is missing (Debian, root).
# Environment: REDIS_PORT (16379), REDIS_N (300000), REDIS_SINGLE_N (30000; 0 skips Redis's
# one-connection run, which is context only), CARGO_TARGET_DIR.
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
if [ "$redis_single_n" -gt 0 ]; then
    disk_probe
    echo "\$ ${redis_single_cmd[*]}"
    "${redis_single_cmd[@]}" 2>/dev/null | grep '^"' | tee "$work/redis-single.csv"
fi
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

# ---- targets -----------------------------------------------------------------------------------
# Numbers are compared with awk; a figure a run did not produce ("" or "-") fails its target.
ms() { awk -v us="$1" 'BEGIN { if (us == "") print "-"; else printf "%.3f", us / 1000 }'; }
rate() { awk -v r="$1" 'BEGIN { if (r == "" || r == "-") print "-"; else printf "%.0f", r }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "-" && a != "" && b + 0 > 0) printf "%.2f", a / b; else printf "-" }'; }
# holds EXPR: awk's verdict on a numeric condition, "yes" or "no".
holds() { awk "BEGIN { exit !($1) }" && echo yes || echo no; }
num() { [ -n "$1" ] && [ "$1" != "-" ] && echo "$1" || echo "-1e300"; }

r_rate=$(rate "$(redis "$work/redis-multi.csv" rps)")
r_p50=$(redis "$work/redis-multi.csv" p50_latency_ms)
r_p99=$(redis "$work/redis-multi.csv" p99_latency_ms)
redis_anchor="Redis 64 conns: ${r_rate}/s, p50 ${r_p50} ms, p99 ${r_p99} ms"

section "targets: zoomq against anchors measured in this run (1 KiB edits, durable acks)"
printf '%-46s | %-58s | %-72s | %s\n' "target" "zoomq" "anchor" "verdict"
line() { printf '%-46s | %-58s | %-72s | %s\n' "$@"; }
# verdict NAME=OK ...: "met", or "MISSED (names of the parts that failed)".
verdict() {
    local missed=()
    for part in "$@"; do [ "${part##*=}" = yes ] || missed+=("${part%=*}"); done
    if [ ${#missed[@]} -eq 0 ]; then echo met; else (IFS=','; echo "MISSED (${missed[*]})"); fi
}
# zoomq_line RUN: "N/s, p50 X ms, p99 Y ms, Z us CPU/edit" for a run of the bench.
zoomq_line() {
    printf '%s/s, p50 %s ms, p99 %s ms, %s us CPU/edit' "$(rate "$(zoomq "$1" rate)")" \
        "$(ms "$(zoomq "$1" p50_us)")" "$(ms "$(zoomq "$1" p99_us)")" \
        "$(awk -v c="$(zoomq "$1" cpu_us_per_ack)" 'BEGIN { printf "%.1f", c }')"
}

if [ -n "$(zoomq pipelined rate)" ]; then
    p_rate=$(rate "$(zoomq pipelined rate)")
    p_ratio=$(ratio "$p_rate" "$r_rate")
    line "pipelined $(zoomq pipelined connections) x $(zoomq pipelined window): >= 1.0x Redis, >= 60,000/s" \
        "$(zoomq_line pipelined)" "$redis_anchor; zoomq/Redis ${p_ratio}x" \
        "$(verdict ">=1.0x Redis=$(holds "$(num "$p_ratio") >= 1.0")" \
            ">=60,000/s=$(holds "$(num "$p_rate") >= 60000")")"
fi
if [ -n "$(zoomq window1 rate)" ]; then
    w_rate=$(rate "$(zoomq window1 rate)")
    w_ratio=$(ratio "$w_rate" "$r_rate")
    w_p99=$(ms "$(zoomq window1 p99_us)")
    line "window1 $(zoomq window1 connections) x 1: >= 0.8x Redis, p99 < 5 ms" \
        "$(zoomq_line window1)" "$redis_anchor; zoomq/Redis ${w_ratio}x" \
        "$(verdict ">=0.8x Redis=$(holds "$(num "$w_ratio") >= 0.8")" \
            "p99<5ms=$(holds "$(num "$w_p99") >= 0 && $(num "$w_p99") < 5")")"
fi
if [ -n "$(zoomq single rate)" ]; then
    s_p50=$(ms "$(zoomq single p50_us)")
    f_p50=$(ms "$(zoomq single fsync_p50_us)")
    o_p50=$(ms "$(zoomq single fsync_overwrite_p50_us)")
    line "single 1 x 1: p50 < 0.3 ms" \
        "$(zoomq_line single)" \
        "fdatasync p50 ${f_p50} ms (4 KiB append), ${o_p50} ms (overwrite); zoomq/append $(ratio "$s_p50" "$f_p50")x" \
        "$(verdict "p50<0.3ms=$(holds "$(num "$s_p50") >= 0 && $(num "$s_p50") < 0.3")")"
fi
if [ "$redis_single_n" -gt 0 ]; then
    echo "(context: Redis 1 conn: $(rate "$(redis "$work/redis-single.csv" rps)")/s," \
        "p50 $(redis "$work/redis-single.csv" p50_latency_ms) ms; zoomq single:" \
        "$(rate "$(zoomq single rate)")/s)"
fi
echo "(zoomq: Unix socket, newline-delimited JSON, 1 KiB JSON content per edit, distinct message"
echo " ids; Redis: TCP loopback, LPUSH of a 1024-byte value, -P 1; CPU/edit: the daemon process's"
echo " user + system time in the measured interval per acknowledged edit)"
echo "load avg after: $(cut -d' ' -f1-3 /proc/loadavg)"
