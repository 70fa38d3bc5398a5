#!/usr/bin/env bash
# bench/cache.sh: the cache benchmark. One origin, three caches in front of it, measured one
# after the other with the same object set and the same load:
#
#   nginx    wrk -> nginx, proxy_cache (1 worker)  -> origin
#   varnish  wrk -> varnishd, malloc storage       -> origin
#   outpost  wrk -> outpost serve, [cache]         -> origin
#
# Two phases (BENCH_PHASES), each with a fresh origin and a fresh, empty cache per target:
#
#   hit      BENCH_HIT_OBJECTS objects (/obj/0 ...), Cache-Control: max-age=3600. Every object
#            is fetched once through the cache, a second pass checks that each is now a hit,
#            then wrk cycles over them (warm-up, then the measured run). Per target: requests,
#            req/s, p50/p99, CPU-µs per request, and how many requests reached the origin
#            during the measured run (should be 0). Then outpost/nginx and outpost/varnish.
#   offload  Zipf(BENCH_ZIPF_S) popularity over BENCH_OFFLOAD_KEYS keys (/zipf/0 ...),
#            Cache-Control: max-age=BENCH_OFFLOAD_TTL, one run of BENCH_OFFLOAD_DURATION from
#            an empty cache, no warm-up. Per target: client requests, origin requests (the
#            origin's /__count before and after) and the fraction that reached the origin.
#
# Pinning (2 cores): the cache under test alone on core 0; the origin and wrk share core 1.
#
# Settings (environment), besides those of bench/lib.sh (BENCH_DURATION, BENCH_CONNECTIONS, ...):
#   BENCH_PHASES             phases to run, comma-separated                (default hit,offload)
#   BENCH_TARGETS            caches to measure, comma-separated     (default nginx,varnish,outpost)
#   BENCH_SKIP_OUTPOST=1     leave outpost out (and do not build it)
#   BENCH_OUTPOST_BIN        an outpost binary to measure instead of building one
#   BENCH_BODY_BYTES         size of every object                          (default 1024)
#   BENCH_HIT_OBJECTS        objects in the hit phase                      (default 100)
#   BENCH_OFFLOAD_DURATION   the offload run, per target                   (default 60s)
#   BENCH_OFFLOAD_KEYS       keys in the offload phase                     (default 10000)
#   BENCH_OFFLOAD_TTL        max-age the origin sends in the offload phase (default 30)
#   BENCH_ZIPF_S             Zipf exponent                                 (default 1)
#   BENCH_SEED               seed of the Zipf sampling (wrk/zipf.lua)      (default 1)
#   BENCH_SERVER_CPU         core of the cache under test                  (default 0)
#   BENCH_ORIGIN_CPU         core of the origin                            (default 1)
#   BENCH_READY_TIMEOUT      seconds a cache gets to become ready          (default 20)
#   BENCH_NGINX_OPEN_FILE_CACHE  1: nginx keeps its cache files open (open_file_cache),
#                            0: it opens each file per hit, as by default (default 1)
#
# See bench/README.md.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

: "${BENCH_PHASES:=hit,offload}"
: "${BENCH_TARGETS:=nginx,varnish,outpost}"
: "${BENCH_SKIP_OUTPOST:=0}"
: "${BENCH_BODY_BYTES:=1024}"
: "${BENCH_HIT_OBJECTS:=100}"
: "${BENCH_OFFLOAD_DURATION:=60s}"
: "${BENCH_OFFLOAD_KEYS:=10000}"
: "${BENCH_OFFLOAD_TTL:=30}"
: "${BENCH_ZIPF_S:=1}"
: "${BENCH_SEED:=1}"
: "${BENCH_SERVER_CPU:=0}"
: "${BENCH_ORIGIN_CPU:=1}"
: "${BENCH_READY_TIMEOUT:=20}"
: "${BENCH_NGINX_OPEN_FILE_CACHE:=1}"

# What the origin sends in the hit phase: longer than any run.
HIT_TTL=3600
# Cache size, the same for the three: memory for Varnish and outpost, max_size for nginx.
CACHE_MB=256

# --- settings ----------------------------------------------------------------------------
phases=()
IFS=, read -r -a phase_list <<<"$BENCH_PHASES"
for p in "${phase_list[@]}"; do
    case $p in
        hit | offload) phases+=("$p") ;;
        "") ;;
        *) bench_die "BENCH_PHASES: unknown phase '$p' (hit, offload)" ;;
    esac
done
((${#phases[@]})) || bench_die "BENCH_PHASES: no phase to run"

targets=()
IFS=, read -r -a target_list <<<"$BENCH_TARGETS"
for t in "${target_list[@]}"; do
    case $t in
        nginx | varnish) targets+=("$t") ;;
        outpost) [[ $BENCH_SKIP_OUTPOST == 1 ]] || targets+=("$t") ;;
        "") ;;
        *) bench_die "BENCH_TARGETS: unknown target '$t' (nginx, varnish, outpost)" ;;
    esac
done
((${#targets[@]})) || bench_die "BENCH_TARGETS: no target to measure"
for n in "$BENCH_BODY_BYTES" "$BENCH_HIT_OBJECTS" "$BENCH_OFFLOAD_KEYS" "$BENCH_OFFLOAD_TTL" "$BENCH_SEED"; do
    [[ $n =~ ^[0-9]+$ ]] || bench_die "not a whole number: '$n' (BENCH_BODY_BYTES, BENCH_HIT_OBJECTS, BENCH_OFFLOAD_KEYS, BENCH_OFFLOAD_TTL, BENCH_SEED)"
done
((BENCH_HIT_OBJECTS > 0 && BENCH_OFFLOAD_KEYS > 0 && BENCH_OFFLOAD_TTL > 0)) ||
    bench_die "BENCH_HIT_OBJECTS, BENCH_OFFLOAD_KEYS and BENCH_OFFLOAD_TTL must be > 0"
[[ $BENCH_NGINX_OPEN_FILE_CACHE == [01] ]] || bench_die "BENCH_NGINX_OPEN_FILE_CACHE: 0 or 1"
[[ $BENCH_ZIPF_S =~ ^[0-9]+(\.[0-9]+)?$ ]] || bench_die "BENCH_ZIPF_S: not a number: '$BENCH_ZIPF_S'"
has_target() { [[ " ${targets[*]} " == *" $1 "* ]]; }

# The temp dir holds nginx's cache files and Varnish's working directory (its shared-memory
# log, written for every request): on tmpfs when there is one, so that nothing they write
# goes to disk. outpost's cache is in its memory anyway.
if [[ -z ${TMPDIR:-} && -d /dev/shm && -w /dev/shm ]]; then
    TMPDIR=/dev/shm bench_init cache
else
    bench_init cache
fi
BENCH_OFFLOAD_DURATION=$(bench_duration_arg "$BENCH_OFFLOAD_DURATION")

# nginx and varnishd are needed by their target only: if one cannot be installed, its target
# is skipped. The rest is needed by all.
bench_require_tools wrk curl taskset getconf pgrep ss awk
declare -A unavailable=()
for t in nginx varnish; do
    has_target "$t" || continue
    tool=$t
    [[ $t == varnish ]] && tool=varnishd
    # In a subshell: bench_require_tools exits when it cannot install.
    if ! (bench_require_tools "$tool"); then
        unavailable[$t]="$tool is not installed and could not be installed"
    fi
done
[[ :$PATH: == *:/usr/sbin:* ]] || PATH="$PATH:/usr/sbin"

taskset -c "$BENCH_SERVER_CPU,$BENCH_ORIGIN_CPU,$BENCH_CLIENT_CPU" true 2>/dev/null ||
    bench_die "cores $BENCH_SERVER_CPU, $BENCH_ORIGIN_CPU and $BENCH_CLIENT_CPU are not all usable here (taskset)"

# --- build -------------------------------------------------------------------------------
target_dir=${CARGO_TARGET_DIR:-$BENCH_REPO_DIR/target}
[[ $target_dir == /* ]] || target_dir=$BENCH_REPO_DIR/$target_dir
bench_log "building: cargo build --release -p outpost-bench-origin"
(cd "$BENCH_REPO_DIR" && cargo build --release -p outpost-bench-origin) ||
    bench_die "cargo build -p outpost-bench-origin failed"
origin_bin=$target_dir/release/outpost-bench-origin
outpost_bin=${BENCH_OUTPOST_BIN:-$target_dir/release/outpost}
[[ -x $origin_bin ]] || bench_die "no $origin_bin after the build"
# outpost is one target among three: if it does not build, the others are still measured.
if has_target outpost && [[ -z ${BENCH_OUTPOST_BIN:-} ]]; then
    bench_log "building: cargo build --release -p outpost"
    if ! (cd "$BENCH_REPO_DIR" && cargo build --release -p outpost); then
        bench_log "outpost: cargo build failed: outpost will be skipped"
        unavailable[outpost]="cargo build --release -p outpost failed"
    fi
fi

bench_log "kernel $(uname -r), $(nproc) cores, CLK_TCK $(bench_clk_tck), $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
bench_log "pinning: cache on core $BENCH_SERVER_CPU, origin on core $BENCH_ORIGIN_CPU, wrk on core $BENCH_CLIENT_CPU; temp dir $BENCH_TMP"
if has_target nginx && [[ -z ${unavailable[nginx]:-} ]]; then bench_log "nginx: $(nginx -v 2>&1)"; fi
if has_target varnish && [[ -z ${unavailable[varnish]:-} ]]; then bench_log "varnish: $(varnishd -V 2>&1 | head -n 1)"; fi

# --- helpers -----------------------------------------------------------------------------
curl_get() { curl -s --noproxy '*' --max-time "${2:-2}" "$1"; }

# Checks that URL answers 200 with a body of BENCH_BODY_BYTES, so that a cache answering
# something else (an error page, say) is not what gets measured.
check_body() {
    local url=$1 got
    got=$(curl -s --noproxy '*' --max-time 2 -o /dev/null -w '%{http_code} %{size_download}' "$url") || true
    [[ $got == "200 $BENCH_BODY_BYTES" ]] && return 0
    bench_log "$url answered '${got:-nothing}' (status and body size), expected '200 $BENCH_BODY_BYTES'"
    return 1
}

origin_pid=""
origin_port=""

# origin_start CACHE_CONTROL: a fresh origin (request count 0) sending that Cache-Control.
origin_start() {
    origin_port=$(bench_free_port)
    bench_spawn "origin-$phase" taskset -c "$BENCH_ORIGIN_CPU" "$origin_bin" \
        --cache-control "$1" "127.0.0.1:$origin_port" "$BENCH_BODY_BYTES"
    origin_pid=$BENCH_LAST_PID
    if ! bench_wait_http "http://127.0.0.1:$origin_port/__count" 10 "$origin_pid"; then
        bench_log_tail "origin-$phase"
        bench_die "the origin did not start"
    fi
    check_body "http://127.0.0.1:$origin_port/" || bench_die "the origin does not answer as expected"
    # Busy during every run but not measured: not noise from elsewhere.
    BENCH_CONTEXT_PIDS=$origin_pid
}

# origin_count: requests the origin has served so far.
origin_count() {
    local n
    n=$(curl_get "http://127.0.0.1:$origin_port/__count") || true
    n=${n//[$'\r\n ']/}
    if [[ ! $n =~ ^[0-9]+$ ]]; then
        bench_log "could not read the origin's request count (got '${n:-nothing}')"
        return 1
    fi
    echo "$n"
}

# The hooks bench_measure runs around the measured run (see lib.sh).
origin_before=""
origin_during=""
ideal_during=""
hook_origin_mark() { origin_before=$(origin_count); }
hook_origin_delta() {
    local after
    after=$(origin_count) || return 1
    origin_during=$((after - origin_before))
    BENCH_POST_RUN_JSON="\"origin_requests\":$origin_during"
    if [[ $phase == offload ]]; then
        ideal_during=$(ideal_origin_requests "$BENCH_WRK_RPS" "$BENCH_WRK_ELAPSED_S")
        BENCH_POST_RUN_JSON+=",\"origin_fraction\":$(fraction "$origin_during" "$BENCH_WRK_REQUESTS")"
        BENCH_POST_RUN_JSON+=",\"ideal_origin_requests\":$ideal_during"
    fi
}

fraction() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.5f\n", a / b; else print "null" }'
}

# ideal_origin_requests RPS SECONDS: an estimate of how many requests a cache that keeps every
# object exactly its TTL (and fetches each miss once) sends to the origin, starting empty,
# for a Zipf load of RPS over SECONDS: a reference for the measured counts, not a bound.
# It assumes the requests for key k arrive at random (Poisson, rate λ = RPS × p_k): the
# first request fetches at time E1, the object is then fresh for TTL, the first request
# after that fetches again, and so on: fetch j happens at (j - 1) × TTL + E1 + ... + Ej, a
# Gamma(j, λ) delay, so the expected number of fetches within SECONDS is the sum over j of
# P(Gamma(j, λ) <= SECONDS - (j - 1) × TTL), computed with the Poisson tail formula (in
# logarithms: λt reaches 10^5 for the most popular keys).
ideal_origin_requests() {
    awk -v rps="$1" -v T="$2" -v n="$BENCH_OFFLOAD_KEYS" -v s="$BENCH_ZIPF_S" -v ttl="$BENCH_OFFLOAD_TTL" 'BEGIN {
        if (rps <= 0 || T <= 0) { print 0; exit }
        for (k = 1; k <= n; k++) h += k ^ -s
        for (k = 1; k <= n; k++) {
            l = rps * k ^ -s / h
            for (j = 1; (t = T - (j - 1) * ttl) > 0; j++) {
                # P(Poisson(x) <= j - 1) = sum over i < j of exp(-x) x^i / i!
                x = l * t; lt = 0; below = exp(-x)
                for (i = 1; i < j; i++) { lt += log(x) - log(i); below += exp(-x + lt) }
                e += (below < 1) ? 1 - below : 0
            }
        }
        printf "%.0f\n", e
    }'
}

# Per target, set by start_TARGET: the PIDs whose CPU is counted, the PID to stop, the base
# URL. On failure, start_TARGET returns 1 with the reason in skip_reason.
srv_pids=()
srv_main=""
srv_url=""
skip_reason=""

# Waits for a cache to answer GET URL with 200; sets skip_reason if it does not.
wait_ready() {
    local target=$1 url=$2 pid=$3
    if bench_wait_http "$url" "$BENCH_READY_TIMEOUT" "$pid"; then return 0; fi
    if kill -0 "$pid" 2>/dev/null && ! bench_is_zombie "$pid"; then
        skip_reason="$target not ready (GET $url != 200) within ${BENCH_READY_TIMEOUT}s"
    else
        local status=0
        wait "$pid" || status=$?
        skip_reason="$target exited (status $status) before it was ready"
    fi
    bench_log "$target: $skip_reason; its output:"
    bench_log_tail "$target-$phase"
    return 1
}

start_nginx() {
    local dir=$BENCH_TMP/nginx-$phase port
    mkdir -p "$dir"
    # Workers run as an unprivileged user when nginx starts as root: let them into the temp
    # dir (nginx gives them the cache directory it creates).
    chmod 755 "$BENCH_TMP" "$dir"
    port=$(bench_free_port)
    # The cache: file-backed, as nginx's cache always is, in the temp dir (tmpfs when there
    # is one); keys in a 16 MiB shared zone (about 128k keys); files written in place
    # (use_temp_path=off). Freshness from the origin's Cache-Control; concurrent misses of
    # one key wait for the first fetch (proxy_cache_lock). open_file_cache keeps the
    # descriptors of the cache files open (what a busy nginx cache is configured with: it
    # saves an open, a fstat and a close per hit, a third of nginx's CPU per hit here).
    local open_file_cache="# open_file_cache off (BENCH_NGINX_OPEN_FILE_CACHE=0)"
    if [[ $BENCH_NGINX_OPEN_FILE_CACHE == 1 ]]; then
        open_file_cache="open_file_cache max=$((BENCH_OFFLOAD_KEYS + BENCH_HIT_OBJECTS + 100)) inactive=60s;"
    fi
    cat >"$dir/nginx.conf" <<EOF
$(bench_nginx_head "$dir")

    proxy_cache_path $dir/cache levels=1:2 keys_zone=bench:16m max_size=${CACHE_MB}m inactive=1h use_temp_path=off;
    $open_file_cache

    upstream origin {
        server 127.0.0.1:$origin_port;
        keepalive 64;
    }

    server {
        listen 127.0.0.1:$port;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache bench;
            proxy_cache_lock on;
            add_header X-Cache-Status \$upstream_cache_status;
        }
    }
}
EOF
    local args=(-p "$dir/" -c "$dir/nginx.conf" -e "$dir/error.log")
    if ! nginx -t -q "${args[@]}" 2>"$dir/nginx-t.log"; then
        sed 's/^/    | /' "$dir/nginx-t.log" >&2
        skip_reason="nginx rejects $dir/nginx.conf"
        return 1
    fi
    bench_spawn "nginx-$phase" taskset -c "$BENCH_SERVER_CPU" nginx "${args[@]}" -g 'daemon off;'
    srv_main=$BENCH_LAST_PID
    srv_url="http://127.0.0.1:$port"
    if ! wait_ready nginx "$srv_url/__ready" "$srv_main"; then
        tail -n 20 "$dir/error.log" >&2 || true
        return 1
    fi
    # The master's children: one worker, the cache manager (it enforces max_size and
    # inactive: part of the cache's cost), and the cache loader, left out: it sleeps, reads
    # the (empty) cache directory a minute after start and exits, which would make it a
    # process "dying during the run".
    local child title workers=0
    srv_pids=("$srv_main")
    for child in $(bench_children "$srv_main"); do
        title=$(tr '\0' ' ' 2>/dev/null <"/proc/$child/cmdline") || continue
        case $title in
            *"worker process"*)
                workers=$((workers + 1))
                srv_pids+=("$child")
                ;;
            *"cache manager"*) srv_pids+=("$child") ;;
        esac
    done
    if ((workers != 1)); then
        skip_reason="expected 1 nginx worker, found $workers"
        return 1
    fi
}

start_varnish() {
    local dir=$BENCH_TMP/varnish-$phase port children
    # -F: foreground. The default jail ("unix"): started as root, the manager runs as the
    # varnish user and the cache process as vcache (users the Debian package creates); as
    # another user, everything runs as that user. -n: a fresh working directory (shared-memory
    # log and counters), which varnishd creates. -T none: no management CLI port. -b: the origin, with
    # the built-in VCL (caches GETs without cookies or Authorization for the TTL the origin
    # sends). -s malloc: the cache in memory. Thread pools as by default (2 pools, 100
    # threads each started in advance; a connection is served by a thread of its own):
    # thread_pools=1, for the one core, measured the same.
    port=$(bench_free_port)
    bench_spawn "varnish-$phase" taskset -c "$BENCH_SERVER_CPU" varnishd -F \
        -n "$dir" -T none -a "127.0.0.1:$port" -b "127.0.0.1:$origin_port" \
        -s "malloc,${CACHE_MB}m"
    srv_main=$BENCH_LAST_PID
    srv_url="http://127.0.0.1:$port"
    wait_ready varnish "$srv_url/__ready" "$srv_main" || return 1
    # The manager and its child, the cache process (named cache-main), which serves.
    mapfile -t children < <(bench_children "$srv_main")
    if ((${#children[@]} != 1)); then
        skip_reason="expected 1 varnish cache process under the manager, found ${#children[@]}"
        return 1
    fi
    srv_pids=("$srv_main" "${children[@]}")
}

start_outpost() {
    local port admin_port config=$BENCH_TMP/outpost-$phase.toml
    if [[ ! -x $outpost_bin ]]; then
        skip_reason="no outpost binary at $outpost_bin"
        return 1
    fi
    port=$(bench_free_port)
    admin_port=$(bench_free_port)
    {
        bench_outpost_head "$port" "$admin_port"
        printf '\n[cache]\nmemory_size = "%s MiB"\n' "$CACHE_MB"
        bench_outpost_origin "$origin_port"
        bench_outpost_route
        printf '\n[routes.cache]\n'
    } >"$config"
    # Pinned to one core: tokio sizes its worker pool from the affinity mask, so 1 worker.
    bench_spawn "outpost-$phase" taskset -c "$BENCH_SERVER_CPU" "$outpost_bin" serve --config "$config"
    srv_main=$BENCH_LAST_PID
    srv_url="http://127.0.0.1:$port"
    srv_pids=("$srv_main")
    wait_ready outpost "http://127.0.0.1:$admin_port/readyz" "$srv_main"
}

# is_hit TARGET X-CACHE-STATUS X-VARNISH CACHE-STATUS: whether a response was a cache hit,
# from the headers each cache sets: nginx's $upstream_cache_status (added to the config),
# Varnish's X-Varnish (two transaction ids on a hit: this request's and the one that stored
# the object), outpost's Cache-Status (RFC 9211).
is_hit() {
    case $1 in
        nginx) [[ $2 == HIT ]] ;;
        varnish) [[ $3 =~ ^[0-9]+\ [0-9]+$ ]] ;;
        outpost) [[ ${4,,} == "outpost; hit"* ]] ;;
    esac
}

# fetch_pass TARGET PATH... : GETs every PATH through the cache on one connection; prints
# "STATUS SIZE HIT|MISS HEADERS" per path.
fetch_pass() {
    local target=$1 cfg=$BENCH_TMP/curl-$1-$phase.cfg path line code size rest xcs xv cs
    shift
    : >"$cfg"
    for path in "$@"; do printf 'url = "%s%s"\noutput = "/dev/null"\n' "$srv_url" "$path" >>"$cfg"; done
    curl -s --noproxy '*' --max-time 5 -K "$cfg" \
        -w '%{http_code} %{size_download} %header{x-cache-status}|%header{x-varnish}|%header{cache-status}\n' |
        while read -r code size rest; do
            IFS='|' read -r xcs xv cs <<<"$rest"
            if is_hit "$target" "$xcs" "$xv" "$cs"; then line=HIT; else line=MISS; fi
            printf '%s %s %s x-cache-status=%s x-varnish=%s cache-status=%s\n' \
                "$code" "$size" "$line" "${xcs:--}" "${xv:--}" "${cs:--}"
        done
}

# warm_and_check TARGET PATH...: fetches every path once (all must be 200 with the body), then
# again: all must be hits. Sets skip_reason and returns 1 otherwise.
warm_and_check() {
    local target=$1 first second bad hits
    shift
    first=$(fetch_pass "$target" "$@") || true
    bad=$(awk -v b="$BENCH_BODY_BYTES" '$1 != 200 || $2 != b' <<<"$first" | head -n 3)
    if [[ -n $bad || $(grep -c . <<<"$first") -ne $# ]]; then
        bench_log "$target: filling the cache: not every object answered 200 with $BENCH_BODY_BYTES bytes:"
        awk '{ print "    | " $0 }' <<<"${bad:-"(fewer answers than requests)"}" >&2
        skip_reason="$target does not pass the origin's responses through"
        return 1
    fi
    second=$(fetch_pass "$target" "$@") || true
    hits=$(grep -c ' HIT ' <<<"$second" || true)
    bench_log "$target: second pass over the $# objects: $hits hits; first: $(head -n 1 <<<"$second" | cut -d' ' -f3-)"
    if ((hits != $#)); then
        grep -v ' HIT ' <<<"$second" | head -n 3 | sed 's/^/    | /' >&2
        skip_reason="only $hits of $# responses were cache hits after filling the cache"
        return 1
    fi
}

# --- phases ------------------------------------------------------------------------------
declare -A cpu_us=() p99_us=() rps=() origin_reqs=() client_reqs=() ideal=()
hit_rows=()
offload_rows=()
base_extra="\"body_bytes\":$BENCH_BODY_BYTES,\"server_cpu\":\"$BENCH_SERVER_CPU\",\"origin_cpu\":\"$BENCH_ORIGIN_CPU\",\"nginx_open_file_cache\":$BENCH_NGINX_OPEN_FILE_CACHE"
run_duration=$BENCH_DURATION
run_warmup=$BENCH_WARMUP

# measure_target TARGET PATH...: a fresh cache, the checks of the phase, the measured run.
measure_target() {
    local target=$1
    shift
    skip_reason=${unavailable[$target]:-}
    srv_main=""
    if [[ -z $skip_reason ]]; then
        bench_log "$target ($phase): starting with an empty cache"
        if "start_$target"; then
            if [[ $phase == hit ]]; then
                warm_and_check "$target" "$@" || true
            elif ! check_body "$srv_url/__check"; then
                skip_reason="$target does not pass the origin's response through"
            else
                local probe
                probe=$(fetch_pass "$target" /__check) || true
                [[ $probe == *" HIT "* ]] ||
                    bench_log "$target: WARNING: a second GET of /__check was not a cache hit: $probe"
            fi
        fi
    fi
    if [[ -z $skip_reason ]]; then
        BENCH_PRE_RUN=hook_origin_mark
        BENCH_POST_RUN=hook_origin_delta
        if bench_measure "$target" "$srv_url/" "${srv_pids[@]}"; then
            local key="$phase/$target"
            cpu_us[$key]=$BENCH_RESULT_CPU_US
            p99_us[$key]=$BENCH_RESULT_P99_US
            rps[$key]=$BENCH_RESULT_RPS
            client_reqs[$key]=$BENCH_WRK_REQUESTS
            origin_reqs[$key]=$origin_during
            if [[ $phase == hit ]]; then
                if ((origin_during > 0)); then
                    bench_log "$target: WARNING: $origin_during requests reached the origin during the measured run (expected 0: all objects were cached)"
                else
                    bench_log "$target: no request reached the origin during the measured run"
                fi
            else
                ideal[$key]=$ideal_during
                bench_log "$target: $origin_during of $BENCH_WRK_REQUESTS requests reached the origin"
            fi
        else
            skip_reason="the measured run failed"
        fi
        # bench_measure names wrk's raw output after the target: keep each phase's.
        local f
        for f in "$BENCH_TMP/wrk-$target.txt" "$BENCH_TMP/wrk-$target-warmup.txt"; do
            if [[ -e $f ]]; then mv "$f" "${f%.txt}-$phase.txt"; fi
        done
        BENCH_PRE_RUN=""
        BENCH_POST_RUN=""
    fi
    if [[ -n $skip_reason ]]; then
        bench_log "$target ($phase): SKIPPED: $skip_reason"
        bench_add_skipped "$target" "$skip_reason"
    fi
    # The next cache gets core 0 to itself, and starts empty.
    if [[ -n $srv_main ]]; then bench_stop "$srv_main"; fi
    return 0
}

for phase in "${phases[@]}"; do
    BENCH_ROWS=()
    paths=()
    case $phase in
        hit)
            bench_log "=== hit phase: $BENCH_HIT_OBJECTS objects of $BENCH_BODY_BYTES bytes, max-age=$HIT_TTL"
            origin_start "max-age=$HIT_TTL"
            for ((k = 0; k < BENCH_HIT_OBJECTS; k++)); do paths+=("/obj/$k"); done
            BENCH_WRK_SCRIPT=$BENCH_LIB_DIR/wrk/paths.lua
            BENCH_WRK_SCRIPT_ARGS=("$BENCH_HIT_OBJECTS" /obj/)
            BENCH_DURATION=$run_duration
            BENCH_WARMUP=$run_warmup
            BENCH_EXTRA_JSON="$base_extra,\"phase\":\"hit\",\"objects\":$BENCH_HIT_OBJECTS,\"ttl_s\":$HIT_TTL"
            ;;
        offload)
            bench_log "=== offload phase: Zipf s=$BENCH_ZIPF_S over $BENCH_OFFLOAD_KEYS keys, max-age=$BENCH_OFFLOAD_TTL, $BENCH_OFFLOAD_DURATION per cache from empty"
            origin_start "max-age=$BENCH_OFFLOAD_TTL"
            BENCH_WRK_SCRIPT=$BENCH_LIB_DIR/wrk/zipf.lua
            BENCH_WRK_SCRIPT_ARGS=("$BENCH_OFFLOAD_KEYS" "$BENCH_ZIPF_S" "$BENCH_SEED" /zipf/)
            BENCH_DURATION=$BENCH_OFFLOAD_DURATION
            BENCH_WARMUP=0s
            BENCH_EXTRA_JSON="$base_extra,\"phase\":\"offload\",\"keys\":$BENCH_OFFLOAD_KEYS,\"zipf_s\":$BENCH_ZIPF_S,\"seed\":$BENCH_SEED,\"ttl_s\":$BENCH_OFFLOAD_TTL"
            ;;
    esac
    for target in "${targets[@]}"; do
        measure_target "$target" "${paths[@]}"
    done
    bench_stop "$origin_pid"
    BENCH_CONTEXT_PIDS=""
    if [[ $phase == hit ]]; then hit_rows=("${BENCH_ROWS[@]}"); else offload_rows=("${BENCH_ROWS[@]}"); fi
done

# --- report ------------------------------------------------------------------------------
echo
echo "cache benchmark, ${BENCH_BODY_BYTES}-byte objects, wrk -t${BENCH_THREADS} -c${BENCH_CONNECTIONS} on core ${BENCH_CLIENT_CPU}," \
    "origin on core ${BENCH_ORIGIN_CPU}, cache on core ${BENCH_SERVER_CPU}"
echo "CPU-µs/req: CPU (utime+stime) of the cache's processes per request; CPU %: their busy time over the"
echo "run (100 = one core); other %: CPU used meanwhile by processes outside the benchmark (should be ~0)"
if has_target nginx; then
    echo "nginx open_file_cache: $( ((BENCH_NGINX_OPEN_FILE_CACHE)) && echo on || echo "off (BENCH_NGINX_OPEN_FILE_CACHE=0)")"
fi
for phase in "${phases[@]}"; do
    echo
    if [[ $phase == hit ]]; then
        echo "== hit: $BENCH_HIT_OBJECTS objects, all cached (max-age=$HIT_TTL), wrk cycling over them, ${run_duration} after ${run_warmup} of warm-up"
        BENCH_ROWS=("${hit_rows[@]}")
        bench_print_table
        echo
        for target in "${targets[@]}"; do
            [[ -n ${origin_reqs[hit/$target]:-} ]] || continue
            printf 'origin requests during the measured run, %-8s %s\n' "$target:" "${origin_reqs[hit/$target]}"
        done
        if has_target outpost && { has_target nginx || has_target varnish; }; then
            echo
            for base in nginx varnish; do
                has_target "$base" || continue
                printf 'outpost/%-8s CPU-µs/req: %s   p99: %s\n' "$base" \
                    "$(bench_ratio "${cpu_us[hit/outpost]:-}" "${cpu_us[hit/$base]:-}")" \
                    "$(bench_ratio "${p99_us[hit/outpost]:-}" "${p99_us[hit/$base]:-}")"
            done
            echo "(target: outpost/nginx CPU-µs/req <= 0.80)"
        fi
    else
        echo "== offload: Zipf s=$BENCH_ZIPF_S over $BENCH_OFFLOAD_KEYS keys, max-age=$BENCH_OFFLOAD_TTL, ${BENCH_OFFLOAD_DURATION} per cache from an empty cache, no warm-up"
        BENCH_ROWS=("${offload_rows[@]}")
        bench_print_table
        echo
        printf '%-10s %12s %12s %11s %16s\n' target 'client req' 'origin req' 'to origin' 'ideal TTL cache'
        for target in "${targets[@]}"; do
            key=offload/$target
            [[ -n ${origin_reqs[$key]:-} ]] || continue
            awk -v t="$target" -v c="${client_reqs[$key]}" -v o="${origin_reqs[$key]}" -v i="${ideal[$key]}" 'BEGIN {
                printf "%-10s %12d %12d %10.2f%% %7d (%5.2f%%)\n", t, c, o, (c > 0 ? o / c * 100 : 0), i, (c > 0 ? i / c * 100 : 0)
            }'
        done
        echo "(target: <= 5% to origin. The fraction depends on the request rate: each key costs about one"
        echo " fetch per TTL, so a faster run has a smaller fraction. \"ideal TTL cache\": estimate for a cache"
        echo " that keeps every object exactly its TTL, at the rate this target ran)"
    fi
done
echo
echo "results: ${BENCH_RESULTS_FILE#"$BENCH_REPO_DIR"/}"
