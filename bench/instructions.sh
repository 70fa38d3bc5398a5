#!/usr/bin/env bash
# bench/instructions.sh: user-space instructions per pass-through request, outpost vs nginx, in
# the same run, counted by valgrind's callgrind. The deterministic companion of proxy.sh: on a
# VM whose vCPU speed drifts, CPU-µs per request move ±15 % from run to run, while an
# instruction count repeats to within 0.5 %, so it shows what a change to the request path
# costs or saves. It counts only user space (the kernel's share, ~70 % of proxy.sh's figure, is
# the same for both: the same four syscalls per request) and runs one client connection.
#
#   origin   outpost-bench-origin (1 KiB body)
#   nginx    under callgrind, one process (master_process off), upstream keepalive
#   outpost  under callgrind, `outpost serve`, access log off
#   floor    under callgrind, outpost-bench-floor: hyper's server and client and nothing else
#            (see proxy.sh); BENCH_FLOOR=0 leaves it out
#
# Each server gets BENCH_WARMUP_REQUESTS requests (pools, caches, lazy init), then its counters
# are zeroed, then BENCH_REQUESTS requests on one keep-alive connection (curl's URL globbing),
# then its counters are dumped: instructions / requests. Prints both and the ratio.
#
# Both servers run pinned to one core (BENCH_SERVER_CPU), as in proxy.sh: outpost sizes its
# runtime from the cores it may use, so pinned it runs the single-threaded scheduler there too.
#
# With BENCH_LOAD=wrk, the load is wrk's instead (-t1 -c$BENCH_CONNECTIONS, default 32, pinned
# to BENCH_CLIENT_CPU): 2 s of warm-up, then BENCH_LOAD_SECONDS measured, divided by the
# requests wrk completed. That is proxy.sh's load: with many connections ready at once, each wake-up of
# a server (epoll, scheduler, timer wheel) is shared by several requests, so the figure is
# lower than on one connection, for both servers.
#
# Settings (environment): BENCH_REQUESTS (default 3000), BENCH_WARMUP_REQUESTS (500),
# BENCH_OUTPOST_BIN (an outpost binary instead of building one), BENCH_BODY_BYTES (1024),
# BENCH_SERVER_CPU (0), BENCH_LOAD (curl, or wrk), and for wrk BENCH_CONNECTIONS (32),
# BENCH_LOAD_SECONDS (10), BENCH_CLIENT_CPU (1), BENCH_FLOOR (1).
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

: "${BENCH_REQUESTS:=3000}"
: "${BENCH_WARMUP_REQUESTS:=500}"
: "${BENCH_BODY_BYTES:=1024}"
: "${BENCH_LOAD:=curl}"
: "${BENCH_LOAD_SECONDS:=10}"
[[ $BENCH_LOAD == curl || $BENCH_LOAD == wrk ]] || { echo "BENCH_LOAD must be curl or wrk" >&2; exit 2; }
[[ $BENCH_LOAD_SECONDS =~ ^[1-9][0-9]*$ ]] || { echo "BENCH_LOAD_SECONDS must be a positive integer" >&2; exit 2; }
: "${BENCH_SERVER_CPU:=0}"
: "${BENCH_FLOOR:=1}"

bench_init instructions
bench_require_tools nginx curl valgrind callgrind_control ss awk taskset
[[ $BENCH_LOAD == curl ]] || bench_require_tools wrk

bench_build || bench_die "cargo build failed"
origin_bin=$BENCH_BIN_DIR/outpost-bench-origin
outpost_bin=$BENCH_OUTPOST
floor_bin=$BENCH_BIN_DIR/outpost-bench-floor

origin_port=$(bench_free_port)
bench_spawn origin "$origin_bin" "127.0.0.1:$origin_port" "$BENCH_BODY_BYTES"
bench_wait_http "http://127.0.0.1:$origin_port/" 10 "$BENCH_LAST_PID" || bench_die "the origin did not start"

# count NAME PID URL: warm-up, zero, measured requests, dump; prints instructions per request.
count() {
    local name=$1 pid=$2 url=$3 out before after got wrk_out
    local wrk=(taskset -c "$BENCH_CLIENT_CPU" wrk -t1 -c"$BENCH_CONNECTIONS")
    if [[ $BENCH_LOAD == curl ]]; then
        curl -s --noproxy '*' -o /dev/null "${url}warm[1-$BENCH_WARMUP_REQUESTS]"
    else
        "${wrk[@]}" -d2s "$url" >/dev/null
    fi
    callgrind_control -z "$pid" >/dev/null 2>&1
    before=$(ls "$BENCH_TMP/$name".cg.* 2>/dev/null | wc -l)
    if [[ $BENCH_LOAD == curl ]]; then
        got=$(curl -s --noproxy '*' -o /dev/null -w '%{http_code}\n' "${url}m[1-$BENCH_REQUESTS]" | grep -c '^200$' || true)
        ((got == BENCH_REQUESTS)) || bench_die "$name answered $got of $BENCH_REQUESTS requests with 200"
    else
        wrk_out=$("${wrk[@]}" -d"${BENCH_LOAD_SECONDS}s" "$url") || bench_die "wrk failed against $name"
        ! grep -q 'Non-2xx' <<<"$wrk_out" || bench_die "$name answered some requests with errors: $wrk_out"
        got=$(awk '/requests in/ { print $1 }' <<<"$wrk_out")
        [[ $got =~ ^[1-9][0-9]*$ ]] || bench_die "no requests completed against $name: $wrk_out"
    fi
    callgrind_control -d "$pid" >/dev/null 2>&1
    for _ in $(seq 100); do
        after=$(ls "$BENCH_TMP/$name".cg.* 2>/dev/null | wc -l)
        ((after > before)) && break
        sleep 0.1
    done
    out=$(ls -t "$BENCH_TMP/$name".cg.* | head -1)
    awk -v n="$got" '/^summary:/ { printf "%.0f\n", $2 / n; exit }' "$out"
}

callgrind=(taskset -c "$BENCH_SERVER_CPU" valgrind --tool=callgrind --dump-instr=no)

# --- nginx -------------------------------------------------------------------------------
nginx_dir=$BENCH_TMP/nginx
mkdir -p "$nginx_dir"
chmod 755 "$BENCH_TMP" "$nginx_dir"
nginx_port=$(bench_free_port)
{
    echo "master_process off;"
    bench_nginx_head "$nginx_dir"
    bench_nginx_proxy "$nginx_port" "$origin_port"
    echo "}"
} >"$nginx_dir/nginx.conf"
bench_spawn nginx "${callgrind[@]}" "--callgrind-out-file=$BENCH_TMP/nginx.cg.%p" \
    nginx -p "$nginx_dir/" -c "$nginx_dir/nginx.conf" -g 'daemon off;'
nginx_pid=$BENCH_LAST_PID
bench_wait_http "http://127.0.0.1:$nginx_port/" 60 "$nginx_pid" || bench_die "nginx did not start under valgrind"
nginx_ins=$(count nginx "$nginx_pid" "http://127.0.0.1:$nginx_port/")
bench_stop "$nginx_pid"

# --- outpost -----------------------------------------------------------------------------
proxy_port=$(bench_free_port)
admin_port=$(bench_free_port)
bench_outpost_passthrough "$proxy_port" "$admin_port" "$origin_port" >"$BENCH_TMP/outpost.toml"
bench_spawn outpost "${callgrind[@]}" "--callgrind-out-file=$BENCH_TMP/outpost.cg.%p" \
    "$outpost_bin" serve --config "$BENCH_TMP/outpost.toml"
outpost_pid=$BENCH_LAST_PID
bench_wait_http "http://127.0.0.1:$admin_port/readyz" 120 "$outpost_pid" ||
    bench_die "outpost did not become ready under valgrind"
outpost_ins=$(count outpost "$outpost_pid" "http://127.0.0.1:$proxy_port/")
bench_stop "$outpost_pid"

# --- the hyper floor ----------------------------------------------------------------------
floor_ins=""
if [[ $BENCH_FLOOR == 1 ]]; then
    floor_port=$(bench_free_port)
    bench_spawn floor "${callgrind[@]}" "--callgrind-out-file=$BENCH_TMP/floor.cg.%p" \
        "$floor_bin" "127.0.0.1:$floor_port" "127.0.0.1:$origin_port"
    floor_pid=$BENCH_LAST_PID
    bench_wait_http "http://127.0.0.1:$floor_port/" 60 "$floor_pid" || bench_die "the floor proxy did not start under valgrind"
    floor_ins=$(count floor "$floor_pid" "http://127.0.0.1:$floor_port/")
    bench_stop "$floor_pid"
fi

if [[ $BENCH_LOAD == curl ]]; then
    load="$BENCH_REQUESTS requests on one connection"
else
    load="wrk -c$BENCH_CONNECTIONS for ${BENCH_LOAD_SECONDS}s"
fi
printf '\nuser-space instructions per request (callgrind), %s, %s-byte body\n\n' "$load" "$BENCH_BODY_BYTES"
printf '%-10s %12s\n' target instructions nginx "$nginx_ins" outpost "$outpost_ins"
[[ -z $floor_ins ]] || printf '%-10s %12s\n' floor "$floor_ins"
echo
printf 'outpost/nginx  instructions: %s\n' "$(bench_ratio "$outpost_ins" "$nginx_ins")"
if [[ -n $floor_ins ]]; then
    printf 'floor/nginx    instructions: %s\n' "$(bench_ratio "$floor_ins" "$nginx_ins")"
    printf 'outpost/floor  instructions: %s\n' "$(bench_ratio "$outpost_ins" "$floor_ins")"
fi
printf '{"bench":"instructions","git":"%s","connections":%s,"requests":%s,"body_bytes":%s,"nginx":%s,"outpost":%s,"floor":%s}\n' \
    "$(bench_git_rev)" "$( [[ $BENCH_LOAD == curl ]] && echo 1 || echo "$BENCH_CONNECTIONS")" "$( [[ $BENCH_LOAD == curl ]] && echo "$BENCH_REQUESTS" || echo null)" "$BENCH_BODY_BYTES" "$nginx_ins" "$outpost_ins" "${floor_ins:-null}" >>"$BENCH_RESULTS_FILE"
printf 'results: %s\n' "${BENCH_RESULTS_FILE#"$BENCH_REPO_DIR"/}"
