#!/usr/bin/env bash
# Static checks of zoomq's deployment files. Runs as root on a fresh Debian (CI) or as any user
# who already has systemd-analyze, promtool and jq. Needs no running systemd and no daemon.
#
#   deploy/check-deploy.sh
#
# Checks, each reported as "ok" or "FAIL" (every check runs; the exit status is 1 if any failed):
#   - systemd-analyze verify of zoomq.service and zoomq.socket,
#   - systemd-analyze security --offline=yes: overall exposure of zoomq.service <= MAX_EXPOSURE,
#   - sysusers.d and tmpfiles.d files apply cleanly and define every user/group the units name,
#   - promtool check config / check rules / test rules,
#   - the Grafana dashboard: valid JSON, every panel has targets and every target an expr, no
#     hard-coded data source uid, the datasource and instance variables exist, unique panel ids,
#   - every metric name used by the rules and the dashboard exists in src/metrics/families.rs (or
#     is one of the standard process_* metrics, or `up`).
#
# `systemd-analyze verify` insists that ExecStart= exists. Rather than creating /usr/bin/zoomq
# on the host, the units are verified in a throwaway root (--root=) holding a copy of the host's
# system units, the two zoomq units and a stub /usr/bin/zoomq.
set -euo pipefail

MAX_EXPOSURE=${MAX_EXPOSURE:-2.0}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
deploy=$repo/deploy
service=$deploy/systemd/zoomq.service
socket=$deploy/systemd/zoomq.socket
sysusers=$deploy/sysusers.d/zoomq.conf
tmpfiles=$deploy/tmpfiles.d/zoomq.conf
rules=$deploy/prometheus/zoomq-rules.yml
rules_test=$deploy/prometheus/zoomq-rules.test.yml
prom_config=$deploy/prometheus/prometheus.yml
dashboard=$repo/grafana/zoomq-dashboard.json
metrics_rs=$repo/src/metrics/families.rs

export SYSTEMD_PAGER=cat SYSTEMD_COLORS=0 LC_ALL=C.UTF-8

work=$(mktemp -d)
policy_rc_d_added=no
cleanup() {
    rm -rf "$work"
    if [[ $policy_rc_d_added == yes ]]; then rm -f /usr/sbin/policy-rc.d; fi
}
trap cleanup EXIT

failures=()
ok() { printf 'ok:   %s\n' "$1"; }
fail() {
    printf 'FAIL: %s\n' "$1"
    if [[ $# -gt 1 && -n $2 ]]; then printf '%s\n' "$2" | sed 's/^/      /'; fi
    failures+=("$1")
}

# ----------------------------------------------------------------------------- tools
install_missing() {
    local packages=()
    command -v systemd-analyze >/dev/null || packages+=(systemd)
    command -v promtool >/dev/null || packages+=(prometheus)
    command -v jq >/dev/null || packages+=(jq)
    [[ ${#packages[@]} -eq 0 ]] && return 0
    if [[ $(id -u) -ne 0 ]]; then
        echo "missing tools (${packages[*]}); run as root or install them" >&2
        exit 1
    fi
    echo "installing ${packages[*]}"
    # Only promtool is wanted from the prometheus package: keep its postinst from starting a
    # Prometheus server on hosts that run systemd (policy-rc.d 101 = action forbidden).
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        policy_rc_d_added=yes
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
}
install_missing

# ----------------------------------------------------------------------------- systemd
check_units_verify() {
    local root=$work/root output
    mkdir -p "$root/usr/bin" "$root/usr/lib/systemd" "$root/etc/systemd/system"
    ln -s usr/lib "$root/lib"
    # The host's units (sockets.target, network-online.target, ...) resolve the dependencies.
    cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/system"
    cp "$service" "$socket" "$root/etc/systemd/system/"
    printf '#!/bin/sh\nexit 0\n' >"$root/usr/bin/zoomq"
    chmod 755 "$root/usr/bin/zoomq"
    # verify exits 0 on mere warnings (unknown keys, bad values), so any output is a failure.
    if ! output=$(systemd-analyze verify --root="$root" --man=no --recursive-errors=no \
        "$root/etc/systemd/system/zoomq.socket" "$root/etc/systemd/system/zoomq.service" 2>&1); then
        fail "systemd-analyze verify zoomq.socket zoomq.service" "$output"
    elif [[ -n $output ]]; then
        fail "systemd-analyze verify zoomq.socket zoomq.service (warnings)" "$output"
    else
        ok "systemd-analyze verify zoomq.socket zoomq.service"
    fi
}

check_security() {
    local output exposure
    output=$(cd "$deploy/systemd" && systemd-analyze security --offline=yes --no-pager zoomq.service 2>&1) || true
    exposure=$(printf '%s\n' "$output" | sed -n 's/.*Overall exposure level for zoomq\.service: \([0-9.]*\).*/\1/p')
    if [[ -z $exposure ]]; then
        fail "systemd-analyze security: no overall exposure level found" "$output"
    elif awk -v e="$exposure" -v max="$MAX_EXPOSURE" 'BEGIN { exit !(e <= max) }'; then
        ok "systemd-analyze security zoomq.service: exposure $exposure <= $MAX_EXPOSURE"
    else
        fail "systemd-analyze security zoomq.service: exposure $exposure > $MAX_EXPOSURE" \
            "$(printf '%s\n' "$output" | grep '✗' || true)"
    fi
}

# The value of KEY= in a unit file (last assignment wins, as in systemd).
unit_value() { sed -n "s/^$2=//p" "$1" | tail -n 1; }

check_users() {
    local root=$work/users output name mode_owner
    mkdir -p "$root/etc" "$root/usr/lib/sysusers.d" "$root/usr/lib/tmpfiles.d"
    cp /etc/passwd /etc/group "$root/etc/"
    cp "$sysusers" "$root/usr/lib/sysusers.d/zoomq.conf"
    cp "$tmpfiles" "$root/usr/lib/tmpfiles.d/zoomq.conf"
    if ! output=$(systemd-sysusers --root="$root" zoomq.conf 2>&1); then
        fail "systemd-sysusers zoomq.conf" "$output"
        return 0
    fi
    local missing=()
    for name in "$(unit_value "$service" User)" "$(unit_value "$socket" SocketUser)"; do
        grep -q "^$name:" "$root/etc/passwd" || missing+=("user $name")
    done
    for name in "$(unit_value "$service" Group)" "$(unit_value "$socket" SocketGroup)"; do
        grep -q "^$name:" "$root/etc/group" || missing+=("group $name")
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        fail "sysusers.d/zoomq.conf does not create: ${missing[*]}"
    else
        ok "sysusers.d/zoomq.conf creates every user and group the units name"
    fi
    if ! output=$(systemd-tmpfiles --root="$root" --create zoomq.conf 2>&1); then
        fail "systemd-tmpfiles --create zoomq.conf" "$output"
        return 0
    fi
    mode_owner=$(stat -c '%a %U' "$root/etc/zoomq" 2>/dev/null || true)
    if [[ $mode_owner == "750 root" ]]; then
        ok "tmpfiles.d/zoomq.conf creates /etc/zoomq (0750 root:zoomq)"
    else
        fail "tmpfiles.d/zoomq.conf: /etc/zoomq is '$mode_owner', expected '750 root'" "$output"
    fi
}

# ----------------------------------------------------------------------------- prometheus
check_promtool() {
    local output
    if output=$(promtool check config "$prom_config" 2>&1); then
        ok "promtool check config prometheus.yml"
    else
        fail "promtool check config prometheus.yml" "$output"
    fi
    if output=$(promtool check rules "$rules" 2>&1); then
        ok "promtool check rules zoomq-rules.yml ($(grep -o '[0-9]* rules found' <<<"$output"))"
    else
        fail "promtool check rules zoomq-rules.yml" "$output"
    fi
    if output=$(cd "$(dirname "$rules_test")" && promtool test rules "$(basename "$rules_test")" 2>&1); then
        ok "promtool test rules zoomq-rules.test.yml"
    else
        fail "promtool test rules zoomq-rules.test.yml" "$output"
    fi
    # Every alert must appear in the tests (the tests show both firing and quiet cases).
    local alert untested=()
    while IFS= read -r alert; do
        grep -q "alertname: $alert\$" "$rules_test" || untested+=("$alert")
    done < <(sed -n 's/^ *- alert: *//p' "$rules")
    if [[ ${#untested[@]} -gt 0 ]]; then
        fail "alerts without unit tests: ${untested[*]}"
    else
        ok "every alert has unit tests"
    fi
}

# ----------------------------------------------------------------------------- grafana
check_dashboard() {
    local output
    if ! jq empty "$dashboard" 2>"$work/jq.err"; then
        fail "grafana/zoomq-dashboard.json is not valid JSON" "$(cat "$work/jq.err")"
        return 0
    fi
    # Each check prints offending items, one per line; empty output means it passed.
    local -a names=(
        "no __inputs (import-time data source prompts)"
        "every panel has targets and every target a non-empty expr"
        "no hard-coded data source uid (only \${datasource})"
        "a 'datasource' variable of type datasource, query prometheus"
        "an 'instance' variable"
        "unique panel ids"
        "schemaVersion set"
    )
    local -a programs=(
        'if has("__inputs") then "__inputs present" else empty end'
        '[.panels[] | ., (.panels // [])[]] | map(select(.type != "row"))[]
         | select((.targets // []) == [] or any(.targets[]; (.expr // "") == ""))
         | "panel \(.id) \(.title | tojson)"'
        '.. | objects | select(has("datasource")) | .datasource
         | if type == "string" then select(test("^\\$\\{?datasource\\}?$") | not)
           else select(.uid != null and (.uid | test("^\\$\\{?datasource\\}?$") | not)
                       and .uid != "-- Grafana --")
           end
         | tojson'
        'if any(.templating.list[]; .name == "datasource" and .type == "datasource" and .query == "prometheus")
         then empty else "missing" end'
        'if any(.templating.list[]; .name == "instance") then empty else "missing" end'
        '[.panels[] | ., (.panels // [])[] | .id] | group_by(.) | map(select(length > 1)[0])[] | "id \(.)"'
        'if (.schemaVersion // 0) >= 36 then empty else "schemaVersion \(.schemaVersion)" end'
    )
    local i
    for i in "${!names[@]}"; do
        if ! output=$(jq -r "${programs[$i]}" "$dashboard" 2>&1); then
            fail "dashboard: ${names[$i]} (jq error)" "$output"
        elif [[ -n $output ]]; then
            fail "dashboard: ${names[$i]}" "$output"
        else
            ok "dashboard: ${names[$i]}"
        fi
    done
}

# ----------------------------------------------------------------------------- metric names
check_metric_names() {
    if [[ ! -f $metrics_rs ]]; then
        fail "src/metrics/families.rs not found: cannot check metric names"
        return 0
    fi
    # Names registered in families.rs; histograms also expose _bucket, _sum and _count.
    local known
    known=$(grep -o '"zoomq_[a-z0-9_]*"' "$metrics_rs" | tr -d '"' |
        sed 'p; s/$/_bucket/p; s/_bucket$/_sum/p; s/_sum$/_count/' | sort -u)
    known+=$'\n'"up"$'\n'$(printf 'process_%s\n' resident_memory_bytes cpu_seconds_total \
        open_fds max_fds virtual_memory_bytes start_time_seconds)
    local used unknown
    used=$({
        jq -r '.. | objects | .expr? // empty' "$dashboard"
        grep -v -e '^ *#' -e '^ *summary:' -e '^ *description:' "$rules"
    } | grep -oE '\b(zoomq_[a-z0-9_]+|process_[a-z_]+|up)\b' | sort -u)
    unknown=$(comm -23 <(printf '%s\n' "$used") <(printf '%s\n' "$known" | sort -u))
    if [[ -n $unknown ]]; then
        fail "metric names used by the rules or dashboard but not exported (src/metrics/families.rs)" "$unknown"
    else
        ok "every metric name in the rules and dashboard is exported ($(wc -l <<<"$used") names)"
    fi
}

check_units_verify
check_security
check_users
check_promtool
check_dashboard
check_metric_names

echo
if [[ ${#failures[@]} -gt 0 ]]; then
    echo "check-deploy: ${#failures[@]} check(s) failed:" >&2
    printf '  - %s\n' "${failures[@]}" >&2
    exit 1
fi
echo "check-deploy: all checks passed"
