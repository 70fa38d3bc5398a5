#!/usr/bin/env bash
# bench/websocket.sh: WebSocket messages through the edge. One origin that echoes every message
# (outpost-bench-origin), three ways to reach it, same run:
#
#   direct   wsload -> origin
#   nginx    wsload -> nginx (1 worker, proxy_pass with Upgrade/Connection set) -> origin
#   outpost  wsload -> outpost serve -> origin
#
# The load is outpost-bench-wsload (wrk has no WebSocket): BENCH_CONNECTIONS WebSockets, each
# sending a BENCH_MESSAGE_BYTES binary message and waiting for its echo before the next. A round
# trip is two messages through the proxy, one each way. Pinning as in proxy.sh: the proxy alone
# on core 0, the origin and the load on core 1. Per target: round trips, their rate, p50/p99,
# and the server's CPU (utime+stime from /proc) per round trip; then outpost/nginx, the median
# over BENCH_ROUNDS rounds (nginx and outpost back to back in each, order alternating).
#
# Then the memory each proxy keeps per open WebSocket: BENCH_HOLD (1000) WebSockets opened
# through it and held quiet (outpost-bench-wsload --hold); VmRSS of the proxy before and while
# they are open, divided by their number (BENCH_HOLD=0 skips it).
#
# Settings (environment): BENCH_DURATION (seconds, default 10), BENCH_WARMUP (seconds, 2),
# BENCH_CONNECTIONS (32), BENCH_MESSAGE_BYTES (128), BENCH_ROUNDS (3), BENCH_OUTPOST_BIN (an
# outpost binary instead of building one), BENCH_SERVER_CPU (0), BENCH_ORIGIN_CPU (1),
# BENCH_CLIENT_CPU (1). See bench/README.md.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

: "${BENCH_MESSAGE_BYTES:=128}"
: "${BENCH_ROUNDS:=3}"
: "${BENCH_HOLD:=1000}"
: "${BENCH_SERVER_CPU:=0}"
: "${BENCH_ORIGIN_CPU:=1}"
duration=${BENCH_DURATION%s}
warmup=${BENCH_WARMUP%s}
[[ $duration =~ ^[1-9][0-9]*$ ]] || bench_die "BENCH_DURATION must be whole seconds here (got '$BENCH_DURATION')"
[[ $warmup =~ ^[0-9]+$ ]] || bench_die "BENCH_WARMUP must be whole seconds here (got '$BENCH_WARMUP')"
[[ $BENCH_ROUNDS =~ ^[1-9][0-9]*$ ]] || bench_die "BENCH_ROUNDS must be a whole number from 1"
[[ $BENCH_HOLD =~ ^[0-9]+$ ]] || bench_die "BENCH_HOLD must be a whole number (got '$BENCH_HOLD')"

bench_init websocket
bench_require_tools nginx curl taskset getconf pgrep awk

bench_build || bench_die "cargo build failed"
origin_bin=$BENCH_BIN_DIR/outpost-bench-origin
load_bin=$BENCH_BIN_DIR/outpost-bench-wsload
outpost_bin=$BENCH_OUTPOST
clk=$(bench_clk_tck)

# --- origin ------------------------------------------------------------------------------
origin_port=$(bench_free_port)
bench_spawn origin taskset -c "$BENCH_ORIGIN_CPU" "$origin_bin" "127.0.0.1:$origin_port"
origin_pid=$BENCH_LAST_PID
bench_wait_http "http://127.0.0.1:$origin_port/" 10 "$origin_pid" || bench_die "the origin did not start"

# --- nginx -------------------------------------------------------------------------------
nginx_dir=$BENCH_TMP/nginx
mkdir -p "$nginx_dir"
chmod 755 "$BENCH_TMP" "$nginx_dir"
nginx_port=$(bench_free_port)
{
    # Room for BENCH_HOLD WebSockets (two connections each) beyond the shared head's 1024.
    bench_nginx_head "$nginx_dir" | sed "s/worker_connections 1024;/worker_connections $((2 * BENCH_HOLD + 1024));/"
    cat <<EOF
    upstream origin {
        server 127.0.0.1:$origin_port;
        keepalive 64;
    }

    server {
        listen 127.0.0.1:$nginx_port;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 300s;
        }
    }
}
EOF
} >"$nginx_dir/nginx.conf"
nginx_args=(-p "$nginx_dir/" -c "$nginx_dir/nginx.conf" -e "$nginx_dir/error.log")
nginx -t -q "${nginx_args[@]}" || bench_die "nginx rejects $nginx_dir/nginx.conf"
bench_spawn nginx taskset -c "$BENCH_SERVER_CPU" nginx "${nginx_args[@]}" -g 'daemon off;'
nginx_pid=$BENCH_LAST_PID
bench_wait_http "http://127.0.0.1:$nginx_port/" 10 "$nginx_pid" || bench_die "nginx did not start"
mapfile -t nginx_workers < <(bench_children "$nginx_pid")

# --- outpost -----------------------------------------------------------------------------
proxy_port=$(bench_free_port)
admin_port=$(bench_free_port)
bench_outpost_passthrough "$proxy_port" "$admin_port" "$origin_port" >"$BENCH_TMP/outpost.toml"
bench_spawn outpost taskset -c "$BENCH_SERVER_CPU" "$outpost_bin" serve --config "$BENCH_TMP/outpost.toml"
outpost_pid=$BENCH_LAST_PID
bench_wait_http "http://127.0.0.1:$admin_port/readyz" 20 "$outpost_pid" || {
    bench_log_tail outpost
    bench_die "outpost serve did not become ready"
}

# --- measuring ---------------------------------------------------------------------------
ROWS=()
# measure NAME PORT PID...: warm-up, then the measured run; sets CPU_US (per round trip).
measure() {
    local name=$1 port=$2 before after out trips rate p50 p99 errors cpu_us
    shift 2
    local url="ws://127.0.0.1:$port/ws"
    local load=(taskset -c "$BENCH_CLIENT_CPU" "$load_bin" "$url" "$BENCH_CONNECTIONS")
    if ((warmup > 0)); then
        "${load[@]}" "$warmup" "$BENCH_MESSAGE_BYTES" >/dev/null || bench_die "$name: the warm-up failed"
    fi
    bench_log "$name: measuring ${duration}s, $BENCH_CONNECTIONS WebSockets, ${BENCH_MESSAGE_BYTES}-byte messages"
    before=$(bench_cpu_ticks "$@")
    out=$("${load[@]}" "$duration" "$BENCH_MESSAGE_BYTES") || bench_die "$name: the load failed"
    after=$(bench_cpu_ticks "$@")
    read -r _ trips _ rate _ p50 _ p99 _ errors <<<"$out"
    [[ $trips =~ ^[1-9][0-9]*$ ]] || bench_die "$name: no round trips: $out"
    ((errors == 0)) || bench_log "$name: $errors connection(s) failed during the run"
    cpu_us=$(awk -v t=$((after - before)) -v c="$clk" -v n="$trips" 'BEGIN { printf "%.2f", t / c * 1e6 / n }')
    ROWS+=("$(printf '%-12s %10s %9s %7s %7s %14s %6s' "$name" "$trips" "$rate" "$p50" "$p99" "$cpu_us" "$errors")")
    printf '{"bench":"websocket","target":"%s","git":"%s","round_trips":%s,"rate":%s,"p50_us":%s,"p99_us":%s,"cpu_us_per_round_trip":%s,"errors":%s,"connections":%s,"message_bytes":%s,"duration_s":%s}\n' \
        "$name" "$(bench_git_rev)" "$trips" "$rate" "$p50" "$p99" "$cpu_us" "$errors" "$BENCH_CONNECTIONS" "$BENCH_MESSAGE_BYTES" "$duration" >>"$BENCH_RESULTS_FILE"
    CPU_US=$cpu_us
}

measure direct "$origin_port" "$origin_pid"
ratios=()
for ((round = 1; round <= BENCH_ROUNDS; round++)); do
    suffix=""
    ((BENCH_ROUNDS == 1)) || suffix=".$round"
    if ((round % 2 == 1)); then
        measure "nginx$suffix" "$nginx_port" "$nginx_pid" "${nginx_workers[@]}"
        nginx_cpu=$CPU_US
        measure "outpost$suffix" "$proxy_port" "$outpost_pid"
        outpost_cpu=$CPU_US
    else
        measure "outpost$suffix" "$proxy_port" "$outpost_pid"
        outpost_cpu=$CPU_US
        measure "nginx$suffix" "$nginx_port" "$nginx_pid" "${nginx_workers[@]}"
        nginx_cpu=$CPU_US
    fi
    ratios+=("$(bench_ratio "$outpost_cpu" "$nginx_cpu")")
done

# --- memory per open WebSocket ------------------------------------------------------------
MEMORY=()
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
# hold NAME PORT PID: RSS growth of PID while BENCH_HOLD quiet WebSockets are open through it.
hold() {
    local name=$1 port=$2 pid=$3 before after log=$BENCH_TMP/hold-$1.log holder
    before=$(rss_kib "$pid")
    taskset -c "$BENCH_CLIENT_CPU" "$load_bin" --hold "ws://127.0.0.1:$port/ws" "$BENCH_HOLD" 5 >"$log" 2>&1 &
    holder=$!
    for _ in $(seq 600); do
        grep -q '^open ' "$log" && break
        kill -0 "$holder" 2>/dev/null || bench_die "$name: could not open $BENCH_HOLD WebSockets: $(tail -n 3 "$log")"
        sleep 0.1
    done
    grep -q '^open ' "$log" || bench_die "$name: $BENCH_HOLD WebSockets not open within 60 s"
    after=$(rss_kib "$pid")
    wait "$holder" || true
    MEMORY+=("$(printf '%-12s %10s %10s %12s' "$name" "$before" "$after" "$(((after - before) * 1024 / BENCH_HOLD))")")
    printf '{"bench":"websocket","target":"%s-hold","git":"%s","open":%s,"rss_before_kib":%s,"rss_open_kib":%s}\n' \
        "$name" "$(bench_git_rev)" "$BENCH_HOLD" "$before" "$after" >>"$BENCH_RESULTS_FILE"
}
if ((BENCH_HOLD > 0)); then
    bench_log "memory: $BENCH_HOLD quiet WebSockets held open through each proxy"
    ((${#nginx_workers[@]} == 1)) || bench_die "expected 1 nginx worker, found ${#nginx_workers[@]}"
    hold nginx "$nginx_port" "${nginx_workers[0]}"
    hold outpost "$proxy_port" "$outpost_pid"
fi

echo
echo "WebSocket echo, ${BENCH_MESSAGE_BYTES}-byte messages, $BENCH_CONNECTIONS connections, ${duration}s per target;" \
    "proxy on core $BENCH_SERVER_CPU, origin and load on core $BENCH_CLIENT_CPU"
echo "CPU-µs/rt: the server's CPU (utime+stime) per round trip (two messages through it)"
echo
printf '%-12s %10s %9s %7s %7s %14s %6s\n' target round_trips rate/s p50_us p99_us CPU-µs/rt errors
printf '%s\n' "${ROWS[@]}"
echo
median=$(printf '%s\n' "${ratios[@]}" | sort -g | awk '{ v[NR] = $1 } END { printf "%.2f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
printf 'outpost/nginx  CPU-µs per round trip: %s   (per round: %s)\n' "$median" "${ratios[*]}"
if ((${#MEMORY[@]})); then
    echo
    echo "memory: $BENCH_HOLD quiet WebSockets open through the proxy (VmRSS, KiB)"
    printf '%-12s %10s %10s %12s\n' target before open bytes/socket
    printf '%s\n' "${MEMORY[@]}"
fi
echo "results: ${BENCH_RESULTS_FILE#"$BENCH_REPO_DIR"/}"
