#!/usr/bin/env bash
# bench/proxy.sh: the pass-through benchmark. One origin, three ways to reach it, same run:
#
#   direct   wrk -> origin
#   nginx    wrk -> nginx (1 worker)  -> origin   (upstream keepalive)
#   outpost  wrk -> outpost serve     -> origin
#   floor    wrk -> outpost-bench-floor -> origin   (hyper's server + hyper's client, nothing
#            else: what any proxy built on hyper pays, see bench/origin/src/bin/)
#
# Pinning (2 cores): the proxy under test alone on core 0; the origin and wrk share core 1.
# For each target: requests, req/s, p50/p99 latency, and the CPU the server spent per request
# (utime+stime from /proc, see bench/lib.sh). Then outpost/nginx ratios.
#
# Settings (environment), besides those of bench/lib.sh (BENCH_DURATION, BENCH_CONNECTIONS, ...):
#   BENCH_SKIP_OUTPOST=1   measure direct and nginx only (and do not build outpost)
#   BENCH_OUTPOST_BIN      an outpost binary to measure instead of building one
#   BENCH_BODY_BYTES       size of the origin's response body   (default 1024)
#   BENCH_SERVER_CPU       core of the proxy under test           (default 0)
#   BENCH_ORIGIN_CPU       core of the origin                     (default 1)
#   BENCH_READY_TIMEOUT    seconds outpost gets to become ready   (default 20)
#   BENCH_FLOOR=0          do not measure the hyper floor (default 1)
#   BENCH_ROUNDS           nginx/outpost measurement pairs, taken in turns (default 3, odd
#                          counts are best); the ratios reported are the medians of the
#                          per-round ratios
#
# See bench/README.md.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

: "${BENCH_SKIP_OUTPOST:=0}"
: "${BENCH_BODY_BYTES:=1024}"
: "${BENCH_SERVER_CPU:=0}"
: "${BENCH_ORIGIN_CPU:=1}"
: "${BENCH_READY_TIMEOUT:=20}"
: "${BENCH_ROUNDS:=3}"
: "${BENCH_FLOOR:=1}"

bench_init proxy
bench_require_tools nginx wrk curl taskset getconf pgrep ss awk
BENCH_EXTRA_JSON="\"body_bytes\":$BENCH_BODY_BYTES,\"server_cpu\":\"$BENCH_SERVER_CPU\",\"origin_cpu\":\"$BENCH_ORIGIN_CPU\""

taskset -c "$BENCH_SERVER_CPU,$BENCH_ORIGIN_CPU,$BENCH_CLIENT_CPU" true 2>/dev/null ||
    bench_die "cores $BENCH_SERVER_CPU, $BENCH_ORIGIN_CPU and $BENCH_CLIENT_CPU are not all usable here (taskset)"

# --- build -------------------------------------------------------------------------------
build_args=()
[[ $BENCH_SKIP_OUTPOST != 1 ]] || build_args=(--no-outpost)
bench_build "${build_args[@]}" ||
    bench_die "cargo build failed (BENCH_SKIP_OUTPOST=1 builds and measures without outpost)"
origin_bin=$BENCH_BIN_DIR/outpost-bench-origin
floor_bin=$BENCH_BIN_DIR/outpost-bench-floor
outpost_bin=$BENCH_OUTPOST

# Checks that URL answers 200 with the origin's body, so that a proxy answering something
# else (an error page, say) is not what gets measured.
check_body() {
    local url=$1 got
    got=$(curl -s --noproxy '*' --max-time 2 -o /dev/null -w '%{http_code} %{size_download}' "$url") || true
    [[ $got == "200 $BENCH_BODY_BYTES" ]] && return 0
    bench_log "$url answered '${got:-nothing}' (status and body size), expected '200 $BENCH_BODY_BYTES'"
    return 1
}

bench_log "kernel $(uname -r), $(nproc) cores, CLK_TCK $(bench_clk_tck), $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
bench_log "pinning: proxy on core $BENCH_SERVER_CPU, origin on core $BENCH_ORIGIN_CPU, wrk on core $BENCH_CLIENT_CPU"

# --- origin ------------------------------------------------------------------------------
origin_port=$(bench_free_port)
origin_url="http://127.0.0.1:$origin_port/"
bench_spawn origin taskset -c "$BENCH_ORIGIN_CPU" "$origin_bin" "127.0.0.1:$origin_port" "$BENCH_BODY_BYTES"
origin_pid=$BENCH_LAST_PID
if ! bench_wait_http "$origin_url" 10 "$origin_pid"; then
    bench_log_tail origin
    bench_die "the origin did not start"
fi
check_body "$origin_url" || bench_die "the origin does not answer as expected"
# Busy during every run but not measured (except as "direct"): not noise from elsewhere.
BENCH_CONTEXT_PIDS=$origin_pid

# --- A: direct ---------------------------------------------------------------------------
bench_measure direct "$origin_url" "$origin_pid"

# --- B: nginx ----------------------------------------------------------------------------
nginx_dir=$BENCH_TMP/nginx
mkdir -p "$nginx_dir"
# Workers run as an unprivileged user when nginx starts as root: let them into the temp dirs.
chmod 755 "$BENCH_TMP" "$nginx_dir"
nginx_port=$(bench_free_port)
nginx_url="http://127.0.0.1:$nginx_port/"
{
    bench_nginx_head "$nginx_dir"
    bench_nginx_proxy "$nginx_port" "$origin_port"
    echo "}"
} >"$nginx_dir/nginx.conf"
nginx_args=(-p "$nginx_dir/" -c "$nginx_dir/nginx.conf" -e "$nginx_dir/error.log")
nginx -t -q "${nginx_args[@]}" || bench_die "nginx rejects $nginx_dir/nginx.conf"
bench_spawn nginx taskset -c "$BENCH_SERVER_CPU" nginx "${nginx_args[@]}" -g 'daemon off;'
nginx_pid=$BENCH_LAST_PID
if ! bench_wait_http "$nginx_url" 10 "$nginx_pid"; then
    bench_log_tail nginx
    tail -n 20 "$nginx_dir/error.log" >&2 || true
    bench_die "nginx did not start"
fi
check_body "$nginx_url" || bench_die "nginx does not pass the origin's response through"
mapfile -t nginx_workers < <(bench_children "$nginx_pid")
((${#nginx_workers[@]} == 1)) ||
    bench_die "expected 1 nginx worker, found ${#nginx_workers[@]}: ${nginx_workers[*]}"

# --- C: outpost --------------------------------------------------------------------------
# Both proxies stay up on the proxy core; only the one being measured has work (the other
# waits in epoll), and they take turns, round after round (see the rounds below).
outpost_ready=0
if [[ $BENCH_SKIP_OUTPOST == 1 ]]; then
    bench_log "outpost: skipped (BENCH_SKIP_OUTPOST=1)"
    bench_add_skipped outpost "BENCH_SKIP_OUTPOST=1"
else
    proxy_port=$(bench_free_port)
    admin_port=$(bench_free_port)
    outpost_url="http://127.0.0.1:$proxy_port/"
    outpost_config=$BENCH_TMP/outpost.toml
    bench_outpost_passthrough "$proxy_port" "$admin_port" "$origin_port" >"$outpost_config"
    # Pinned to one core: tokio sizes its worker pool from the affinity mask, so 1 worker.
    bench_spawn outpost taskset -c "$BENCH_SERVER_CPU" "$outpost_bin" serve --config "$outpost_config"
    outpost_pid=$BENCH_LAST_PID
    skip_reason=""
    if ! bench_wait_http "http://127.0.0.1:$admin_port/readyz" "$BENCH_READY_TIMEOUT" "$outpost_pid"; then
        if kill -0 "$outpost_pid" 2>/dev/null && ! bench_is_zombie "$outpost_pid"; then
            skip_reason="outpost serve not ready (GET /readyz != 200) within ${BENCH_READY_TIMEOUT}s"
        else
            status=0
            wait "$outpost_pid" || status=$?
            skip_reason="outpost serve exited (status $status) before it was ready"
        fi
    elif ! check_body "$outpost_url"; then
        skip_reason="outpost does not pass the origin's response through"
    fi
    if [[ -n $skip_reason ]]; then
        bench_log "outpost: SKIPPED: $skip_reason; its output:"
        bench_log_tail outpost
        bench_stop "$outpost_pid"
        bench_add_skipped outpost "$skip_reason"
    else
        outpost_ready=1
    fi
fi

# --- D: the hyper floor ------------------------------------------------------------------
floor_ready=0
if [[ $BENCH_FLOOR == 1 ]]; then
    [[ -x $floor_bin ]] || bench_die "no $floor_bin after the build"
    floor_port=$(bench_free_port)
    floor_url="http://127.0.0.1:$floor_port/"
    bench_spawn floor taskset -c "$BENCH_SERVER_CPU" "$floor_bin" "127.0.0.1:$floor_port" "127.0.0.1:$origin_port"
    floor_pid=$BENCH_LAST_PID
    if bench_wait_http "$floor_url" 10 "$floor_pid" && check_body "$floor_url"; then
        floor_ready=1
    else
        bench_log_tail floor
        bench_die "the hyper floor proxy did not start (BENCH_FLOOR=0 measures without it)"
    fi
fi

# --- rounds: nginx, outpost, nginx, outpost, ... -----------------------------------------
# This VM's speed drifts by ±15 % over minutes; a pair measured back to back sees nearly the
# same machine, so each round gives a ratio and the report takes the median of those.
round_ratios=()
round_p99_ratios=()
round_floor_ratios=() # floor/nginx
round_over_floor=()   # outpost/floor
[[ $BENCH_ROUNDS =~ ^[1-9][0-9]*$ ]] || bench_die "BENCH_ROUNDS must be a whole number from 1 (got '$BENCH_ROUNDS')"
rounds=$BENCH_ROUNDS
((outpost_ready == 1)) || rounds=1
# One measurement; false (and a logged reason) when it could not be taken.
measure_nginx() {
    bench_measure "nginx$1" "$nginx_url" "$nginx_pid" "${nginx_workers[@]}" || return 1
    round_nginx_cpu=$BENCH_RESULT_CPU_US round_nginx_p99=$BENCH_RESULT_P99_US
}
measure_outpost() {
    bench_measure "outpost$1" "$outpost_url" "$outpost_pid" || return 1
    round_outpost_cpu=$BENCH_RESULT_CPU_US round_outpost_p99=$BENCH_RESULT_P99_US
}
# The floor, after the pair (when it is measured), so that the pair stays back to back.
measure_floor() {
    ((floor_ready == 1)) || return 0
    bench_measure "floor$1" "$floor_url" "$floor_pid" || return 1
    round_floor_ratios+=("$(bench_ratio "$BENCH_RESULT_CPU_US" "$round_nginx_cpu")")
    round_over_floor+=("$(bench_ratio "$round_outpost_cpu" "$BENCH_RESULT_CPU_US")")
}
for ((round = 1; round <= rounds; round++)); do
    suffix=""
    ((rounds == 1)) || suffix=".$round"
    round_nginx_cpu="" round_outpost_cpu="" round_nginx_p99="" round_outpost_p99=""
    if ((outpost_ready == 0)); then
        measure_nginx "$suffix" || bench_log "nginx: measurement failed"
        measure_floor "$suffix" || bench_log "floor: measurement failed"
        break
    fi
    # Turns alternate (nginx first in odd rounds, outpost first in even ones), so that a steady
    # drift of the machine does not favour either.
    if ((round % 2 == 1)); then
        measure_nginx "$suffix" && measure_outpost "$suffix"
    else
        measure_outpost "$suffix" && measure_nginx "$suffix"
    fi || {
        bench_log "round $round: a measurement failed (did a proxy die?); reporting the rounds taken"
        break
    }
    round_ratios+=("$(bench_ratio "$round_outpost_cpu" "$round_nginx_cpu")")
    round_p99_ratios+=("$(bench_ratio "$round_outpost_p99" "$round_nginx_p99")")
    measure_floor "$suffix" || {
        bench_log "round $round: the floor's measurement failed; reporting the rounds taken"
        break
    }
done

# --- report ------------------------------------------------------------------------------
echo
echo "pass-through, ${BENCH_BODY_BYTES}-byte body, wrk -t${BENCH_THREADS} -c${BENCH_CONNECTIONS} -d${BENCH_DURATION}" \
    "on core ${BENCH_CLIENT_CPU}, origin on core ${BENCH_ORIGIN_CPU}, proxy on core ${BENCH_SERVER_CPU}"
echo "CPU-µs/req: server CPU (utime+stime) per request; CPU %: server busy time over the run (100 = one core);"
echo "other %: CPU used meanwhile by processes outside the benchmark (should be ~0)"
echo
bench_print_table
echo
# median of a list of numbers ("n/a" when empty or any is n/a)
median() {
    local bad=0 v
    for v in "$@"; do [[ $v == n/a || $v == NaN || -z $v ]] && bad=1; done
    if ((bad || $# == 0)); then
        echo n/a
        return
    fi
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 }
        END { printf "%.2f\n", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
if ((outpost_ready == 1)); then
    if ((${#round_ratios[@]} > 1)); then
        printf 'outpost/nginx per round  CPU-µs/req: %s   p99: %s\n' "${round_ratios[*]}" "${round_p99_ratios[*]}"
    fi
    printf 'outpost/nginx  CPU-µs/req: %s   p99: %s   (median of %s round(s))\n' \
        "$(median "${round_ratios[@]}")" "$(median "${round_p99_ratios[@]}")" "${#round_ratios[@]}"
fi
if ((${#round_floor_ratios[@]} > 0)); then
    printf 'floor/nginx    CPU-µs/req: %s   (per round: %s)\n' "$(median "${round_floor_ratios[@]}")" "${round_floor_ratios[*]}"
    ((outpost_ready == 1)) && printf 'outpost/floor  CPU-µs/req: %s   (per round: %s)\n' "$(median "${round_over_floor[@]}")" "${round_over_floor[*]}"
fi
echo
echo "results: ${BENCH_RESULTS_FILE#"$BENCH_REPO_DIR"/}"
