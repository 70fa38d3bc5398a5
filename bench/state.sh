#!/usr/bin/env bash
# bench/state.sh: the local state API benchmark. The node's store (SQLite, one writer thread,
# group commit, an fsync per commit) over HTTP on the ADMIN listener, against peers measured in
# the same run on the same core:
#
#   nginx     nginx-light, `return 200` with a body as long as a value: the HTTP floor (no state)
#   outpost   `outpost serve`, state API on the admin listener, a single node (no [fleet])
#   fastapi   bench/state_peer.py: FastAPI + uvicorn (1 worker, repo .venv) over SQLite, WAL,
#             synchronous=FULL, one fsync per write (no group commit): the "center" way
#   redis     redis-server, appendonly yes, appendfsync always, measured with redis-benchmark:
#             its own protocol (RESP), a different client: for scale only
#
# Phases (BENCH_PHASES), each at every concurrency of BENCH_STATE_CONNECTIONS (default 1,32:
# group commit amortises the fsync only when writes come together):
#
#   get        GET  /state/kv/bench/k<rand>  over BENCH_KEYS (10,000) keys loaded beforehand
#   put        PUT  /state/kv/put/k<rand>?ttl=1h, BENCH_VALUE_BYTES (100) bytes, random keys
#              out of BENCH_PUT_KEYS (1,000,000): mostly new keys
#   incr-hot   POST /state/counters/hot0/incr?by=1: one hot counter
#   incr-many  POST /state/counters/c<rand>/incr?by=1 over BENCH_COUNTERS (100) counters
#
# Every request carries `Authorization: Bearer <token>` (nginx ignores it). The keys are drawn by
# bench/wrk/state.lua, the same sequence for every target (BENCH_SEED).
#
# Per run: requests, req/s, p50/p99 (wrk), the server's CPU-µs per request (utime+stime of all
# its processes from /proc, see bench/lib.sh), and the disk's flushes per request (from
# /proc/diskstats of the device holding the data dir: an fsync on ext4 with a write-back cache
# is a flush, so this is how many fsyncs reached the disk per write). Then ratios: outpost
# against the nginx floor, the FastAPI peer against outpost.
#
# Pinning (2 cores): the server under test alone on core 0 (all its threads: outpost's event
# loop and its store writer thread, uvicorn's event loop and its thread pool), wrk (or
# redis-benchmark) on core 1. Servers are measured one after the other; each is stopped
# before the next starts.
#
# Checks (a failed check is printed under CHECKS FAILED at the end, and the script exits 1):
#   - the data dir is not on tmpfs/ramfs (an fsync there costs nothing);
#   - each state server answers 401 without the token, 404 for an absent key, 204 for a PUT and
#     the same bytes back, 404 -> 200 for every loaded key sampled, and a counter +1 per incr;
#   - outpost's SQLite file and its WAL are in the data dir;
#   - the get phase gets no 404 (the keys are there), no run has socket errors or non-2xx;
#   - incr phases: the counters grew by what wrk counted (between its requests and its requests
#     plus one in flight per connection): every acknowledged increment is stored, none twice;
#   - write phases of outpost and fastapi: the disk saw flushes during the run (writes are
#     fsynced); redis: appendonly yes and appendfsync always.
#
# Settings (environment), besides those of bench/lib.sh (BENCH_DURATION, BENCH_WARMUP,
# BENCH_THREADS, BENCH_CLIENT_CPU, ...; BENCH_CONNECTIONS is replaced by BENCH_STATE_CONNECTIONS):
#   BENCH_TARGETS            targets, comma-separated, in that order (default nginx,outpost,fastapi,redis)
#   BENCH_PHASES             phases, comma-separated (default get,put,incr-hot,incr-many)
#   BENCH_STATE_CONNECTIONS  wrk -c values, comma-separated (default 1,32)
#   BENCH_KEYS               keys loaded for the get phase (default 10000)
#   BENCH_PUT_KEYS           key space of the put phase (default 1000000)
#   BENCH_VALUE_BYTES        value size (default 100)
#   BENCH_COUNTERS           counters of incr-many (default 100)
#   BENCH_SEED               seed of the key sampling (default 1)
#   BENCH_DATA_PARENT        where the temp dir (and the data dirs) go; a real disk, not tmpfs
#                            (default /var/tmp)
#   BENCH_SERVER_CPU         core of the server under test (default 0)
#   BENCH_OUTPOST_BIN        an outpost binary to measure instead of building one
#   BENCH_PYTHON             python with fastapi and uvicorn (default: the repo's .venv/bin/python)
#   BENCH_READY_TIMEOUT      seconds a server gets to become ready (default 20)
#
# See bench/README.md.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ALL_TARGETS=(nginx outpost fastapi redis)
ALL_PHASES=(get put incr-hot incr-many)
: "${BENCH_TARGETS:=nginx,outpost,fastapi,redis}"
: "${BENCH_PHASES:=get,put,incr-hot,incr-many}"
: "${BENCH_STATE_CONNECTIONS:=1,32}"
: "${BENCH_KEYS:=10000}"
: "${BENCH_PUT_KEYS:=1000000}"
: "${BENCH_VALUE_BYTES:=100}"
: "${BENCH_COUNTERS:=100}"
: "${BENCH_SEED:=1}"
: "${BENCH_DATA_PARENT:=/var/tmp}"
: "${BENCH_SERVER_CPU:=0}"
: "${BENCH_READY_TIMEOUT:=20}"
: "${BENCH_PYTHON:=$BENCH_REPO_DIR/.venv/bin/python}"
PUT_TTL=1h

# --- settings ----------------------------------------------------------------------------
# csv_list OUT VAR ALLOWED...: the comma-separated values of VAR, each one of ALLOWED, into the
# array OUT. Runs in this shell (not in a process substitution), so that bench_die stops the
# script rather than a subshell.
csv_list() {
    local -n csv_out=$1
    local var=$2 v vals=()
    shift 2
    csv_out=()
    IFS=, read -r -a vals <<<"${!var}"
    for v in "${vals[@]}"; do
        [[ -n $v ]] || continue
        [[ " $* " == *" $v "* ]] || bench_die "$var: unknown value '$v' ($*)"
        csv_out+=("$v")
    done
    ((${#csv_out[@]})) || bench_die "$var: nothing to do"
}
csv_list targets BENCH_TARGETS "${ALL_TARGETS[@]}"
csv_list phases BENCH_PHASES "${ALL_PHASES[@]}"
IFS=, read -r -a conns_list <<<"$BENCH_STATE_CONNECTIONS"
conns=()
for c in "${conns_list[@]}"; do
    [[ -n $c ]] || continue
    [[ $c =~ ^[1-9][0-9]*$ ]] || bench_die "BENCH_STATE_CONNECTIONS: not a positive number: '$c'"
    conns+=("$c")
done
((${#conns[@]})) || bench_die "BENCH_STATE_CONNECTIONS: no concurrency to run"
for n in "$BENCH_KEYS" "$BENCH_PUT_KEYS" "$BENCH_VALUE_BYTES" "$BENCH_COUNTERS" "$BENCH_SEED"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || bench_die "not a positive whole number: '$n' (BENCH_KEYS, BENCH_PUT_KEYS, BENCH_VALUE_BYTES, BENCH_COUNTERS, BENCH_SEED)"
done
[[ -d $BENCH_DATA_PARENT && -w $BENCH_DATA_PARENT ]] || bench_die "BENCH_DATA_PARENT: $BENCH_DATA_PARENT is not a writable directory"

# The whole temp dir (configs, logs, and the data dirs of the stores) goes on the disk a real
# deployment would write to, not on tmpfs.
TMPDIR=$BENCH_DATA_PARENT bench_init state
bench_require_tools nginx wrk curl taskset getconf pgrep ss awk
taskset -c "$BENCH_SERVER_CPU,$BENCH_CLIENT_CPU" true 2>/dev/null ||
    bench_die "cores $BENCH_SERVER_CPU and $BENCH_CLIENT_CPU are not both usable here (taskset)"
TOKEN=bench-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
AUTH=(-H "Authorization: Bearer $TOKEN")

# --- the disk ----------------------------------------------------------------------------
bench_data_disk "an fsync there costs nothing"
fs_type=$BENCH_FS_TYPE fs_source=$BENCH_FS_SOURCE disk_name=$BENCH_DISK_NAME
write_cache=$BENCH_WRITE_CACHE fsync_probe=$BENCH_FSYNC_PROBE

# --- build -------------------------------------------------------------------------------
outpost_bin=""
if [[ " ${targets[*]} " == *" outpost "* ]]; then
    if [[ -n ${BENCH_OUTPOST_BIN:-} ]]; then
        outpost_bin=$BENCH_OUTPOST_BIN
    else
        target_dir=${CARGO_TARGET_DIR:-$BENCH_REPO_DIR/target}
        [[ $target_dir == /* ]] || target_dir=$BENCH_REPO_DIR/$target_dir
        bench_log "building: cargo build --release -p outpost"
        (cd "$BENCH_REPO_DIR" && cargo build --release -p outpost) || bench_die "cargo build failed"
        outpost_bin=$target_dir/release/outpost
    fi
fi

bench_log "kernel $(uname -r), $(nproc) cores, CLK_TCK $(bench_clk_tck), $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
bench_log "pinning: server on core $BENCH_SERVER_CPU, load generator on core $BENCH_CLIENT_CPU"

# --- helpers -----------------------------------------------------------------------------
# http METHOD URL [CURL ARGS...]: prints "STATUS BODY" (the body on one line).
http() {
    local method=$1 url=$2 out
    shift 2
    out=$(curl -s --noproxy '*' --max-time 5 -X "$method" -w '\n%{http_code}' "$@" "$url" 2>/dev/null) || true
    printf '%s %s\n' "${out##*$'\n'}" "$(printf '%s' "${out%$'\n'*}" | tr '\n' ' ')"
}

value_bytes=$(awk -v n="$BENCH_VALUE_BYTES" 'BEGIN { p = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"; s = ""; while (length(s) < n) s = s p; print substr(s, 1, n) }')

# counter_value BASE NAME: a counter's value (from its JSON), or nothing.
counter_value() {
    local got
    got=$(http GET "$1/state/counters/$2" "${AUTH[@]}")
    [[ $got == "200 "* ]] || return 1
    grep -o '"value":-\?[0-9]\+' <<<"$got" | head -n 1 | cut -d: -f2
}

# counters_sum BASE PHASE: the sum of the counters the phase increments (one curl, keep-alive).
counters_sum() {
    local base=$1 phase=$2 urls=() k out n
    if [[ $phase == incr-hot ]]; then
        urls=("$base/state/counters/hot0")
    else
        for ((k = 0; k < BENCH_COUNTERS; k++)); do urls+=("$base/state/counters/c$k"); done
    fi
    out=$(curl -s --noproxy '*' --max-time 30 "${AUTH[@]}" "${urls[@]}") || return 1
    n=$(grep -o '"value":-\?[0-9]\+' <<<"$out" | wc -l)
    ((n == ${#urls[@]})) || return 1
    grep -o '"value":-\?[0-9]\+' <<<"$out" | cut -d: -f2 | awk '{ s += $1 } END { printf "%d\n", s }'
}

# pids_of PID: PID and its descendants (nginx's worker, uvicorn's children if any).
pids_of() {
    local p c
    echo "$1"
    for c in $(bench_children "$1"); do pids_of "$c"; done
}


# phase_script PHASE: wrk's state.lua arguments for the phase.
phase_script() {
    case $1 in
        get) BENCH_WRK_SCRIPT_ARGS=(GET /state/kv/bench/k "$BENCH_KEYS" "" 0 "$BENCH_SEED") ;;
        put) BENCH_WRK_SCRIPT_ARGS=(PUT /state/kv/put/k "$BENCH_PUT_KEYS" "?ttl=$PUT_TTL" "$BENCH_VALUE_BYTES" "$BENCH_SEED") ;;
        incr-hot) BENCH_WRK_SCRIPT_ARGS=(POST /state/counters/hot 1 "/incr?by=1" 0 "$BENCH_SEED") ;;
        incr-many) BENCH_WRK_SCRIPT_ARGS=(POST /state/counters/c "$BENCH_COUNTERS" "/incr?by=1" 0 "$BENCH_SEED") ;;
    esac
}

phase_desc() {
    case $1 in
        get) echo "KV GET, random key of $BENCH_KEYS loaded, ${BENCH_VALUE_BYTES}-byte values" ;;
        put) echo "KV PUT ?ttl=$PUT_TTL, ${BENCH_VALUE_BYTES}-byte value, random key of $BENCH_PUT_KEYS (mostly new)" ;;
        incr-hot) echo "PN-counter incr, one hot counter" ;;
        incr-many) echo "PN-counter incr, random counter of $BENCH_COUNTERS" ;;
    esac
}

is_write() { [[ $1 != get ]]; }

# Hooks around each measured run (bench_measure): the disk's flushes, and for a state server
# in an incr phase the counters' sum before and after.
cur_target="" cur_phase="" cur_base="" cur_durable=0
flush0=0 sum0=""
hook_pre() {
    sum0=""
    if [[ $cur_target != nginx && $cur_phase == incr-* ]]; then
        sum0=$(counters_sum "$cur_base" "$cur_phase") || {
            bench_log "could not read the counters before the run"
            sum0=""
        }
    fi
    flush0=$(bench_disk_flushes)
}
hook_post() {
    local flush1 sum1 delta lo hi
    flush1=$(bench_disk_flushes)
    run_flushes=$((flush1 - flush0))
    BENCH_POST_RUN_JSON="\"disk_flushes\":$( [[ -n $disk_name ]] && echo "$run_flushes" || echo null)"
    if [[ -n $sum0 ]]; then
        if sum1=$(counters_sum "$cur_base" "$cur_phase"); then
            delta=$((sum1 - sum0))
            lo=$BENCH_WRK_REQUESTS
            # wrk stops with up to one request per connection unanswered, both at the end of
            # the warm-up (whose requests a slow server may apply after the "before" read)
            # and at the end of the run: at most two per connection applied but not counted.
            hi=$((BENCH_WRK_REQUESTS + 2 * BENCH_CONNECTIONS))
            BENCH_POST_RUN_JSON+=",\"counter_delta\":$delta"
            if ((delta < lo || delta > hi)); then
                bench_check_fail "$cur_target $cur_phase c$BENCH_CONNECTIONS: the counters grew by $delta for $BENCH_WRK_REQUESTS answered increments (expected $lo..$hi)"
            else
                bench_log "$cur_target $cur_phase: counters +$delta for $BENCH_WRK_REQUESTS answered increments (ok)"
            fi
        else
            bench_check_fail "$cur_target $cur_phase: could not read the counters after the run"
        fi
    fi
    if [[ $cur_durable == 1 && -n $disk_name ]] && is_write "$cur_phase" && ((run_flushes == 0)); then
        bench_check_fail "$cur_target $cur_phase c$BENCH_CONNECTIONS: $BENCH_WRK_REQUESTS durable writes and no flush reached disk $disk_name: writes are not fsynced (or the device ignores flushes)"
    fi
}

# Results: one entry per target/phase/connections.
declare -A r_rps=() r_p50=() r_p99=() r_cpu=() r_cpupct=() r_err=() r_other=() r_flush=() r_skip=()
record_row() {
    local key=$1 row
    row=${BENCH_ROWS[-1]}
    IFS=$'\t' read -r _ _ "r_rps[$key]" "r_p50[$key]" "r_p99[$key]" "r_cpu[$key]" "r_cpupct[$key]" "r_err[$key]" "r_other[$key]" <<<"$row"
    if [[ -n $disk_name ]]; then
        r_flush[$key]=$(awk -v f="$run_flushes" -v r="$BENCH_WRK_REQUESTS" 'BEGIN { printf "%.3f", (r > 0) ? f / r : 0 }')
    fi
}
skip_target() {
    local t=$1 reason=$2 p c
    bench_log "$t: SKIPPED: $reason"
    for p in "${phases[@]}"; do for c in "${conns[@]}"; do r_skip[$t/$p/$c]=$reason; done; done
}

# measure_http TARGET BASE_URL PID...: every phase at every concurrency against one server.
measure_http() {
    local t=$1 base=$2 p c key f
    shift 2
    local pids=("$@")
    cur_target=$t
    cur_base=$base
    BENCH_WRK_SCRIPT=$BENCH_LIB_DIR/wrk/state.lua
    BENCH_WRK_EXTRA_ARGS=("${AUTH[@]}")
    BENCH_PRE_RUN=hook_pre
    BENCH_POST_RUN=hook_post
    for p in "${phases[@]}"; do
        cur_phase=$p
        phase_script "$p"
        for c in "${conns[@]}"; do
            key=$t/$p/$c
            BENCH_CONNECTIONS=$c
            BENCH_EXTRA_JSON="\"phase\":\"$p\",\"server_cpu\":\"$BENCH_SERVER_CPU\",\"value_bytes\":$BENCH_VALUE_BYTES,\"keys\":$BENCH_KEYS,\"put_keys\":$BENCH_PUT_KEYS,\"counters\":$BENCH_COUNTERS,\"seed\":$BENCH_SEED,\"fs\":\"$fs_type\",\"disk\":\"${disk_name:-}\""
            if bench_measure "$t" "$base/" "${pids[@]}"; then
                record_row "$key"
                if ((BENCH_WRK_ERRORS > 0 || BENCH_WRK_NON2XX > 0)); then
                    bench_check_fail "$t $p c$c: ${BENCH_WRK_ERRORS} socket errors, ${BENCH_WRK_NON2XX} non-2xx responses$([[ $p == get ]] && echo " (404s: keys missing?)")"
                fi
            else
                r_skip[$key]="the measured run failed"
            fi
            for f in "$BENCH_TMP/wrk-$t.txt" "$BENCH_TMP/wrk-$t-warmup.txt"; do
                if [[ -e $f ]]; then mv "$f" "${f%.txt}-$p-c$c.txt"; fi
            done
            if ! kill -0 "${pids[0]}" 2>/dev/null || bench_is_zombie "${pids[0]}"; then
                bench_check_fail "$t exited during the $p run (c$c)"
                bench_log_tail "$t"
                return 1
            fi
        done
    done
    BENCH_WRK_SCRIPT=""
    BENCH_WRK_SCRIPT_ARGS=()
    BENCH_WRK_EXTRA_ARGS=()
    BENCH_PRE_RUN=""
    BENCH_POST_RUN=""
}

# check_state_api T BASE: the state server does what the benchmark assumes. Sets skip_reason.
check_state_api() {
    local t=$1 base=$2 got v0 v1
    skip_reason=""
    got=$(http GET "$base/state/kv/bench/k0")
    [[ $got == "401 "* ]] || { skip_reason="GET without the token: '$got', expected 401"; return 1; }
    got=$(http GET "$base/state/kv/bench/k0" -H "Authorization: Bearer wrong-$TOKEN")
    [[ $got == "401 "* ]] || { skip_reason="GET with a wrong token: '$got', expected 401"; return 1; }
    got=$(http GET "$base/state/kv/bench/absent-key" "${AUTH[@]}")
    [[ $got == "404 "* ]] || { skip_reason="GET of an absent key: '$got', expected 404"; return 1; }
    got=$(http PUT "$base/state/kv/check/one?ttl=60s" "${AUTH[@]}" --data-binary "$value_bytes")
    [[ $got == "204 "* ]] || { skip_reason="PUT: '$got', expected 204"; return 1; }
    got=$(http GET "$base/state/kv/check/one" "${AUTH[@]}")
    [[ $got == "200 $value_bytes" ]] || { skip_reason="GET after PUT: '${got:0:80}', expected 200 and the ${BENCH_VALUE_BYTES} bytes put"; return 1; }
    got=$(http POST "$base/state/counters/check/incr?by=1" "${AUTH[@]}")
    [[ $got == 200* && $got == *'"type":"pncounter"'* ]] || { skip_reason="counter incr: '$got', expected 200 and a pncounter"; return 1; }
    v0=$(counter_value "$base" check) || v0="?"
    v1=$(http POST "$base/state/counters/check/incr?by=1" "${AUTH[@]}" | grep -o '"value":-\?[0-9]\+' | cut -d: -f2) || v1="?"
    if [[ $v0 != 1 || $v1 != 2 ]]; then
        skip_reason="counter: value $v0 after one incr, $v1 after two (expected 1, 2)"
        return 1
    fi
}

# preload T BASE: BENCH_KEYS keys k0..k(N-1) in namespace bench, each PUT once (python3, 16
# keep-alive connections, every answer must be 204), then spot checks.
preload() {
    local t=$1 base=$2 k got out start=$SECONDS
    if ! out=$(python3 - "$base" "$BENCH_KEYS" "$TOKEN" "$value_bytes" 2>&1 <<'EOF'
import http.client, sys, threading, urllib.parse
base, n, token, value = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].encode()
u = urllib.parse.urlsplit(base)
bad, done, lock = [], [0], threading.Lock()
def work(part):
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    for k in range(part, n, 16):
        conn.request("PUT", f"/state/kv/bench/k{k}", body=value,
                     headers={"Authorization": f"Bearer {token}"})
        r = conn.getresponse()
        r.read()
        with lock:
            done[0] += 1
            if r.status != 204:
                bad.append(f"k{k}: {r.status}")
threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
for th in threads: th.start()
for th in threads: th.join()
print(f"{done[0]} stored, {len(bad)} refused {bad[:3]}")
sys.exit(1 if bad or done[0] != n else 0)
EOF
    ); then
        skip_reason="loading $BENCH_KEYS keys: $out"
        return 1
    fi
    for k in 0 1 $((BENCH_KEYS / 2)) $((BENCH_KEYS - 1)) $((RANDOM % BENCH_KEYS)); do
        got=$(http GET "$base/state/kv/bench/k$k" "${AUTH[@]}")
        [[ $got == "200 $value_bytes" ]] || { skip_reason="after loading, GET k$k: '${got:0:60}', expected 200 with the value"; return 1; }
    done
    bench_log "$t: $out in $((SECONDS - start)) s; spot checks ok"
}

# --- nginx -------------------------------------------------------------------------------
run_nginx() {
    local dir=$BENCH_TMP/nginx port pid workers
    mkdir -p "$dir"
    chmod 755 "$BENCH_TMP" "$dir"
    port=$(bench_free_port)
    cat >"$dir/nginx.conf" <<EOF
$(bench_nginx_head "$dir")
    default_type application/octet-stream;

    server {
        listen 127.0.0.1:$port;
        location / {
            return 200 "$value_bytes";
        }
    }
}
EOF
    local args=(-p "$dir/" -c "$dir/nginx.conf" -e "$dir/error.log")
    nginx -t -q "${args[@]}" || { skip_target nginx "nginx rejects its config"; return 0; }
    bench_spawn nginx taskset -c "$BENCH_SERVER_CPU" nginx "${args[@]}" -g 'daemon off;'
    pid=$BENCH_LAST_PID
    if ! bench_wait_http "http://127.0.0.1:$port/" 10 "$pid"; then
        bench_log_tail nginx
        skip_target nginx "nginx did not start"
        return 0
    fi
    local got
    got=$(http PUT "http://127.0.0.1:$port/state/kv/x/y" --data-binary "$value_bytes")
    [[ $got == "200 $value_bytes" ]] || { skip_target nginx "PUT to nginx: '${got:0:60}', expected 200 and the value"; bench_stop "$pid"; return 0; }
    mapfile -t workers < <(bench_children "$pid")
    ((${#workers[@]} == 1)) || { skip_target nginx "expected 1 nginx worker, found ${#workers[@]}"; bench_stop "$pid"; return 0; }
    bench_check_pinned nginx "${workers[0]}"
    cur_durable=0
    measure_http nginx "http://127.0.0.1:$port" "$pid" "${workers[@]}" || true
    bench_stop "$pid"
}

# --- outpost -----------------------------------------------------------------------------
run_outpost() {
    local dir=$BENCH_TMP/outpost-data port admin_port pid config=$BENCH_TMP/outpost.toml status
    if [[ ! -x $outpost_bin ]]; then skip_target outpost "no outpost binary at $outpost_bin"; return 0; fi
    port=$(bench_free_port)
    admin_port=$(bench_free_port)
    # A single node: no [fleet] (in a fleet every write also appends to the replication log,
    # in the same transaction). No routes: the state API lives on the admin listener.
    bench_outpost_head "$port" "$admin_port" bench-state-1 "$dir" "$TOKEN" >"$config"
    # Pinned to one core: tokio sizes its worker pool from the affinity mask, so 1 worker; the
    # store's writer thread shares the core.
    OUTPOST_ADMIN_TOKEN="" bench_spawn outpost taskset -c "$BENCH_SERVER_CPU" "$outpost_bin" serve --config "$config"
    pid=$BENCH_LAST_PID
    if ! bench_wait_http "http://127.0.0.1:$admin_port/readyz" "$BENCH_READY_TIMEOUT" "$pid"; then
        status=0
        kill -0 "$pid" 2>/dev/null && ! bench_is_zombie "$pid" || wait "$pid" || status=$?
        bench_log_tail outpost
        skip_target outpost "outpost serve not ready on /readyz within ${BENCH_READY_TIMEOUT}s (exit status $status if it exited)"
        bench_check_fail "outpost did not start"
        return 0
    fi
    local base="http://127.0.0.1:$admin_port"
    bench_check_pinned outpost "$pid"
    if ! check_state_api outpost "$base"; then
        bench_check_fail "outpost: $skip_reason"
        skip_target outpost "$skip_reason"
        bench_stop "$pid"
        return 0
    fi
    [[ -s $dir/outpost.db && -e $dir/outpost.db-wal ]] ||
        bench_check_fail "outpost: no outpost.db with its WAL in $dir ($(find "$dir" -mindepth 1 -printf '%f ' 2>/dev/null))"
    bench_log "outpost: store $dir/outpost.db ($fs_type), threads: $(find "/proc/$pid/task" -mindepth 1 -maxdepth 1 | wc -l), /state/fleet: $(http GET "$base/state/fleet" "${AUTH[@]}")"
    if [[ " ${phases[*]} " == *" get "* ]] && ! preload outpost "$base"; then
        bench_check_fail "outpost: $skip_reason"
        skip_target outpost "$skip_reason"
        bench_stop "$pid"
        return 0
    fi
    cur_durable=1
    measure_http outpost "$base" "$pid" || true
    bench_log "outpost: data dir after the runs: $(du -sh "$dir" | cut -f1)"
    bench_stop "$pid"
}

# --- fastapi -----------------------------------------------------------------------------
run_fastapi() {
    local dir=$BENCH_TMP/fastapi-data port pid got
    if ! "$BENCH_PYTHON" -c 'import fastapi, uvicorn' >/dev/null 2>&1; then
        skip_target fastapi "$BENCH_PYTHON cannot import fastapi and uvicorn (BENCH_PYTHON)"
        return 0
    fi
    mkdir -p "$dir"
    port=$(bench_free_port)
    local ver
    ver=$("$BENCH_PYTHON" - <<'EOF'
import sys, sqlite3, importlib.util as u
import fastapi, uvicorn
has = lambda m: "yes" if u.find_spec(m) else "no"
print(f"python {sys.version.split()[0]}, fastapi {fastapi.__version__}, uvicorn {uvicorn.__version__},"
      f" sqlite {sqlite3.sqlite_version}, uvloop {has('uvloop')}, httptools {has('httptools')}")
EOF
)
    bench_log "fastapi: $ver"
    STATE_PEER_DB=$dir/peer.db STATE_PEER_TOKEN=$TOKEN bench_spawn fastapi taskset -c "$BENCH_SERVER_CPU" \
        "$BENCH_PYTHON" -m uvicorn state_peer:app --app-dir "$BENCH_LIB_DIR" --host 127.0.0.1 --port "$port" \
        --workers 1 --no-access-log --log-level warning
    pid=$BENCH_LAST_PID
    local base="http://127.0.0.1:$port"
    if ! bench_wait_http "$base/healthz" "$BENCH_READY_TIMEOUT" "$pid"; then
        bench_log_tail fastapi
        skip_target fastapi "uvicorn not ready within ${BENCH_READY_TIMEOUT}s"
        bench_check_fail "the fastapi peer did not start"
        return 0
    fi
    bench_check_pinned fastapi "$pid"
    if ! check_state_api fastapi "$base"; then
        bench_check_fail "fastapi: $skip_reason"
        skip_target fastapi "$skip_reason"
        bench_stop "$pid"
        return 0
    fi
    got=$("$BENCH_PYTHON" -c 'import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); print(c.execute("PRAGMA journal_mode").fetchone()[0])' "$dir/peer.db" 2>&1)
    [[ $got == wal ]] || bench_check_fail "fastapi: its database is in journal mode '$got', not wal"
    if [[ " ${phases[*]} " == *" get "* ]] && ! preload fastapi "$base"; then
        bench_check_fail "fastapi: $skip_reason"
        skip_target fastapi "$skip_reason"
        bench_stop "$pid"
        return 0
    fi
    cur_durable=1
    local pids
    mapfile -t pids < <(pids_of "$pid")
    measure_http fastapi "$base" "${pids[@]}" || true
    bench_stop "$pid"
}

# --- redis -------------------------------------------------------------------------------
# redis-benchmark's own client and protocol: a figure for scale, not a like-for-like peer.
run_redis() {
    if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-benchmark >/dev/null 2>&1; then
        local sudo=()
        ((EUID == 0)) || sudo=(sudo)
        bench_log "redis: not installed; trying apt-get install redis-server"
        if ! { command -v apt-get >/dev/null 2>&1 && "${sudo[@]}" apt-get update -qq >&2 &&
            DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq redis-server >&2; } ||
            ! command -v redis-benchmark >/dev/null 2>&1; then
            skip_target redis "redis-server / redis-benchmark not installable here"
            return 0
        fi
    fi
    local dir=$BENCH_TMP/redis-data port pid got
    mkdir -p "$dir"
    port=$(bench_free_port)
    bench_spawn redis taskset -c "$BENCH_SERVER_CPU" redis-server --bind 127.0.0.1 --port "$port" \
        --dir "$dir" --save "" --appendonly yes --appendfsync always --protected-mode yes --daemonize no
    pid=$BENCH_LAST_PID
    local cli=(redis-cli -h 127.0.0.1 -p "$port")
    local deadline=$((SECONDS + 10))
    until [[ $("${cli[@]}" ping 2>/dev/null) == PONG ]]; do
        if ((SECONDS > deadline)) || ! kill -0 "$pid" 2>/dev/null; then
            bench_log_tail redis
            skip_target redis "redis-server did not start"
            return 0
        fi
        sleep 0.1
    done
    got="$("${cli[@]}" config get appendonly | tail -n 1) $("${cli[@]}" config get appendfsync | tail -n 1)"
    [[ $got == "yes always" ]] || bench_check_fail "redis: appendonly/appendfsync are '$got', expected 'yes always'"
    bench_check_pinned redis "$pid"
    bench_log "redis: $(redis-server --version | awk '{ print $3 }'), appendonly $got, data in $dir ($fs_type)"
    # Keys for get: key:000000000000 .. as redis-benchmark's -r names them (12 digits).
    if [[ " ${phases[*]} " == *" get "* ]]; then
        awk -v n="$BENCH_KEYS" -v v="$value_bytes" 'BEGIN { for (k = 0; k < n; k++) printf "SET key:%012d %s\r\n", k, v }' |
            "${cli[@]}" --pipe >"$BENCH_TMP/redis-load.txt" 2>&1 || bench_check_fail "redis: loading keys failed"
        got=$("${cli[@]}" get "key:$(printf '%012d' $((BENCH_KEYS - 1)))")
        [[ $got == "$value_bytes" ]] || bench_check_fail "redis: key:$(printf '%012d' $((BENCH_KEYS - 1))) is '${got:0:40}' after loading"
    fi
    local clk p c key args dur_s n csv t0 t1 s0 s1 b0 b1 f0 f1 hot0 hot1 elapsed rps p50 p99 req
    clk=$(bench_clk_tck)
    dur_s=$(awk -v d="$BENCH_DURATION" 'BEGIN { n = d + 0; u = d; sub(/^[0-9.]+/, "", u); m = (u == "m") ? 60 : (u == "h") ? 3600 : 1; print n * m }')
    for p in "${phases[@]}"; do
        case $p in
            get) args=(-t get -r "$BENCH_KEYS" -d "$BENCH_VALUE_BYTES") ;;
            put) args=(-t set -r "$BENCH_PUT_KEYS" -d "$BENCH_VALUE_BYTES") ;;
            incr-hot) args=(-t incr) ;;  # without -r: the one key counter:__rand_int__
            incr-many) args=(-t incr -r "$BENCH_COUNTERS") ;;
        esac
        for c in "${conns[@]}"; do
            key=redis/$p/$c
            # Warm-up, and the rate, to size the measured run to about BENCH_DURATION.
            if ! csv=$(taskset -c "$BENCH_CLIENT_CPU" redis-benchmark -h 127.0.0.1 -p "$port" -c "$c" -n $((c * 200)) --csv "${args[@]}" 2>/dev/null | tail -n 1); then
                r_skip[$key]="redis-benchmark failed"
                continue
            fi
            rps=$(awk -F'","' '{ print $2 }' <<<"$csv")
            n=$(awk -v r="$rps" -v d="$dur_s" -v c="$c" 'BEGIN { n = int(r * d); if (n < c * 100) n = c * 100; print n }')
            hot0=$("${cli[@]}" get 'counter:__rand_int__')
            f0=$(bench_disk_flushes)
            read -r b0 _ < <(bench_sys_ticks)
            s0=$(bench_self_ticks)
            t0=$(bench_cpu_ticks "$pid")
            local start=${EPOCHREALTIME/./}
            bench_log "redis: $p c$c, $n requests (about $dur_s s at the warm-up's rate)"
            csv=$(taskset -c "$BENCH_CLIENT_CPU" redis-benchmark -h 127.0.0.1 -p "$port" -c "$c" -n "$n" --csv "${args[@]}" 2>/dev/null | tail -n 1) || true
            local end=${EPOCHREALTIME/./}
            t1=$(bench_cpu_ticks "$pid")
            s1=$(bench_self_ticks)
            read -r b1 _ < <(bench_sys_ticks)
            f1=$(bench_disk_flushes)
            hot1=$("${cli[@]}" get 'counter:__rand_int__')
            echo "$csv" >"$BENCH_TMP/redis-$p-c$c.csv"
            # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
            IFS=, read -r -a f <<<"${csv//\"/}"
            if [[ ${#f[@]} -lt 7 || -z ${f[1]} ]]; then
                r_skip[$key]="could not read redis-benchmark's output: ${csv:0:80}"
                continue
            fi
            elapsed=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", (b - a) / 1e6 }')
            req=$n
            r_rps[$key]=${f[1]}
            r_p50[$key]=$(awk -v v="${f[4]}" 'BEGIN { printf "%.1f", v * 1000 }')
            r_p99[$key]=$(awk -v v="${f[6]}" 'BEGIN { printf "%.1f", v * 1000 }')
            r_cpu[$key]=$(awk -v d="$((t1 - t0))" -v c="$clk" -v r="$req" 'BEGIN { printf "%.2f", d / c * 1e6 / r }')
            r_cpupct[$key]=$(awk -v d="$((t1 - t0))" -v c="$clk" -v e="$elapsed" 'BEGIN { printf "%.1f", d / c / e * 100 }')
            r_other[$key]=$(awk -v d="$((b1 - b0 - (t1 - t0) - (s1 - s0)))" -v c="$clk" -v e="$elapsed" 'BEGIN { v = d / c / e * 100; if (v < 0) v = 0; printf "%.1f", v }')
            r_err[$key]=0
            [[ -n $disk_name ]] && r_flush[$key]=$(awk -v f="$((f1 - f0))" -v r="$req" 'BEGIN { printf "%.3f", f / r }')
            if [[ $p == incr-hot ]] && (( ${hot1:-0} - ${hot0:-0} != n )); then
                bench_check_fail "redis incr-hot c$c: the counter grew by $(( ${hot1:-0} - ${hot0:-0} )) for $n increments"
            fi
            if [[ -n $disk_name ]] && is_write "$p" && ((f1 - f0 == 0)); then
                bench_check_fail "redis $p c$c: no flush reached disk $disk_name with appendfsync always"
            fi
            if awk -v p="${r_other[$key]}" 'BEGIN { exit !(p > 5) }'; then
                bench_log "redis: WARNING: ${r_other[$key]}% of a core went to processes outside the benchmark during the run"
            fi
            printf '{"bench":"%s","target":"redis","phase":"%s","time":"%s","git":"%s","kernel":"%s","requests":%s,"rps":%s,"p50_us":%s,"p99_us":%s,"cpu_ticks":%s,"clk_tck":%s,"cpu_us_per_req":%s,"cpu_pct":%s,"other_cpu_pct":%s,"elapsed_s":%s,"connections":%s,"client":"redis-benchmark","client_cpu":"%s","server_cpu":"%s","disk_flushes":%s,"value_bytes":%s,"fs":"%s","disk":"%s","pids":"%s"}\n' \
                "$BENCH_NAME" "$p" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(bench_git_rev)" "$(uname -r)" "$req" "${f[1]}" \
                "${r_p50[$key]}" "${r_p99[$key]}" "$((t1 - t0))" "$clk" "${r_cpu[$key]}" "${r_cpupct[$key]}" "${r_other[$key]}" \
                "$elapsed" "$c" "$BENCH_CLIENT_CPU" "$BENCH_SERVER_CPU" "$( [[ -n $disk_name ]] && echo $((f1 - f0)) || echo null)" \
                "$BENCH_VALUE_BYTES" "$fs_type" "$disk_name" "$pid" >>"$BENCH_RESULTS_FILE"
        done
    done
    bench_stop "$pid"
}

# --- measure -----------------------------------------------------------------------------
for t in "${targets[@]}"; do
    bench_log "=== $t"
    "run_$t"
done

# --- report ------------------------------------------------------------------------------
echo
echo "local state API, ${BENCH_VALUE_BYTES}-byte values; server on core $BENCH_SERVER_CPU, load generator on core $BENCH_CLIENT_CPU;" \
    "wrk -t$BENCH_THREADS, ${BENCH_DURATION} after ${BENCH_WARMUP} of warm-up per run"
echo "data dirs in $BENCH_TMP: $fs_type on $fs_source (not tmpfs)${disk_name:+, disk $disk_name (write cache: ${write_cache:-?})};" \
    "4 KiB write + fdatasync there: median $fsync_probe"
echo "outpost: a single node (no [fleet]; in a fleet each write also appends to the replication log, same transaction)"
echo "targets: nginx = 'return 200' + ${BENCH_VALUE_BYTES}-byte body (HTTP floor, no state); outpost = state API on the admin listener;"
echo "         fastapi = bench/state_peer.py, FastAPI + uvicorn (1 worker) over SQLite WAL synchronous=FULL, fsync per write;"
echo "         redis* = redis-server appendfsync always, driven by redis-benchmark: different protocol and client, for scale only"
echo "CPU-µs/op: the server's utime+stime per request; flush/op: disk flushes per request (whole device);"
echo "×outpost: the target's CPU-µs/op over outpost's in the same phase and concurrency; other %: CPU used outside the benchmark"
label() { if [[ $1 == redis ]]; then echo "redis*"; else echo "$1"; fi; }
for p in "${phases[@]}"; do
    echo
    echo "== $p: $(phase_desc "$p")"
    printf "%-6s %-9s %10s %9s %9s %10s %7s %9s %8s %7s %8s\n" conns target 'req/s' 'p50 µs' 'p99 µs' 'CPU-µs/op' 'CPU %' 'flush/op' '×outpost' errors 'other %'
    for c in "${conns[@]}"; do
        for t in "${targets[@]}"; do
            key=$t/$p/$c
            if [[ -n ${r_skip[$key]:-} ]]; then
                printf "%-6s %-9s skipped: %s\n" "$c" "$(label "$t")" "${r_skip[$key]}"
                continue
            fi
            [[ -n ${r_rps[$key]:-} ]] || continue
            printf "%-6s %-9s %10.0f %9.0f %9.0f %10.2f %7.1f %9s %8s %7s %8.1f\n" "$c" "$(label "$t")" \
                "${r_rps[$key]}" "${r_p50[$key]}" "${r_p99[$key]}" "${r_cpu[$key]}" "${r_cpupct[$key]}" \
                "${r_flush[$key]:-n/a}" "$(bench_ratio "${r_cpu[$key]}" "${r_cpu[outpost/$p/$c]:-}")" "${r_err[$key]}" "${r_other[$key]}"
        done
    done
done

# Ratios: outpost against the floor, the python peer against outpost.
if [[ " ${targets[*]} " == *" outpost "* ]]; then
    echo
    echo "ratios (same phase, same connections):"
    printf "%-10s %-6s %14s %12s %12s %15s %15s %14s\n" phase conns 'outpost-nginx' 'out/nginx' 'fastapi/out' 'fastapi/out' 'fastapi/out' 'redis*/out'
    printf "%-10s %-6s %14s %12s %12s %15s %15s %14s\n" '' '' 'CPU-µs/op' 'CPU' 'CPU' 'req/s' 'p99' 'CPU'
    for p in "${phases[@]}"; do
        for c in "${conns[@]}"; do
            o=outpost/$p/$c
            [[ -n ${r_cpu[$o]:-} ]] || continue
            n=nginx/$p/$c
            f=fastapi/$p/$c
            r=redis/$p/$c
            printf "%-10s %-6s %13s %11s %11s %14s %14s %13s\n" "$p" "$c" \
                "$(awk -v a="${r_cpu[$o]}" -v b="${r_cpu[$n]:-}" 'BEGIN { if (b == "" || a == "NaN" || b == "NaN") print "n/a"; else printf "%+.2f\n", a - b }')" \
                "$(bench_ratio "${r_cpu[$o]}" "${r_cpu[$n]:-}")" \
                "$(bench_ratio "${r_cpu[$f]:-}" "${r_cpu[$o]}")" \
                "$(bench_ratio "${r_rps[$f]:-}" "${r_rps[$o]}")" \
                "$(bench_ratio "${r_p99[$f]:-}" "${r_p99[$o]}")" \
                "$(bench_ratio "${r_cpu[$r]:-}" "${r_cpu[$o]}")"
        done
    done
    echo "(outpost-nginx: what the state work costs above the HTTP floor, in CPU-µs per request)"
fi

echo
if ((${#BENCH_CHECK_FAILURES[@]})); then
    echo "CHECKS FAILED (the figures above may not measure what they claim):"
    printf '  - %s\n' "${BENCH_CHECK_FAILURES[@]}"
    echo "results: ${BENCH_RESULTS_FILE#"$BENCH_REPO_DIR"/}"
    exit 1
fi
echo "checks: all passed (auth, 404/204/200 round trips, loaded keys, counters = acknowledged increments, flushes during durable writes)"
echo "results: ${BENCH_RESULTS_FILE#"$BENCH_REPO_DIR"/}"
