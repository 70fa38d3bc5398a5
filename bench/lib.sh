# shellcheck shell=bash
# bench/lib.sh: shared helpers for Outpost's benchmarks (source it, do not run it).
#
# A benchmark script does, in order:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#   bench_init NAME                # temp dir, results file, cleanup trap
#   bench_require_tools            # nginx, wrk, curl, taskset, ... (apt-get when missing)
#   port=$(bench_free_port)
#   bench_spawn LOGNAME taskset -c 0 some-server ...   # sets BENCH_LAST_PID, killed on exit
#   bench_wait_http "http://127.0.0.1:$port/" 10 "$BENCH_LAST_PID"
#   bench_measure TARGET URL PID...  # warm-up, measured wrk run, CPU of PIDs, one result row
#   bench_print_table
#
# Everything started through bench_spawn is stopped when the script exits, whatever the reason.
# Only 127.0.0.1 is ever used.
#
# Settings (environment):
#   BENCH_DURATION     measured wrk run, wrk syntax or plain seconds   (default 10s)
#   BENCH_WARMUP       warm-up run before each measured run, 0: none   (default 2s)
#   BENCH_CONNECTIONS  wrk -c                                          (default 32)
#   BENCH_THREADS      wrk -t                                          (default 1)
#   BENCH_CLIENT_CPU   core(s) wrk is pinned to, taskset -c syntax     (default 1)
#   BENCH_RESULTS_DIR  where the JSON lines go                         (default bench/results)
#   BENCH_KEEP_TMP=1   keep the temp dir (configs, logs, raw wrk output) after the run
#   BENCH_CONTEXT_PIDS processes busy during the runs but not measured (the origin): set by
#                      the script, so that their CPU is not reported as outside noise
#
# Set by a script, not by the environment (see bench_wrk and bench_measure):
#   BENCH_WRK_SCRIPT, BENCH_WRK_SCRIPT_ARGS   a wrk Lua script (-s) and its arguments
#   BENCH_WRK_EXTRA_ARGS                      more wrk options (an array), e.g.
#                                             (-H "Authorization: Bearer $token")
#   BENCH_PRE_RUN, BENCH_POST_RUN             commands run just before / just after the
#                                             measured run (BENCH_POST_RUN_JSON: extra fields)

# This file is sourced; these are used by the scripts that source it.
# shellcheck disable=SC2034

BENCH_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BENCH_REPO_DIR=$(cd "$BENCH_LIB_DIR/.." && pwd)

: "${BENCH_DURATION:=10s}"
: "${BENCH_WARMUP:=2s}"
: "${BENCH_CONNECTIONS:=32}"
: "${BENCH_THREADS:=1}"
: "${BENCH_CLIENT_CPU:=1}"
: "${BENCH_RESULTS_DIR:=$BENCH_LIB_DIR/results}"

BENCH_PIDS=()     # processes started by bench_spawn, stopped by bench_cleanup
BENCH_ROWS=()     # result rows, tab-separated, for bench_print_table
BENCH_TMP=""
BENCH_WRK_PID=""  # the wrk running now, if any
BENCH_NAME=""
BENCH_RESULTS_FILE=""
BENCH_CLK_TCK=""
BENCH_WRK_SCRIPT=""      # wrk -s SCRIPT for every run, if set
BENCH_WRK_SCRIPT_ARGS=() # arguments after `--`, which the script's init(args) gets
BENCH_WRK_EXTRA_ARGS=()  # more wrk options for every run (-H "Name: value", ...), if set
BENCH_PRE_RUN=""         # see bench_measure
BENCH_POST_RUN=""
BENCH_POST_RUN_JSON=""

bench_log() { printf '[bench] %s\n' "$*" >&2; }
bench_die() {
    printf '[bench] error: %s\n' "$*" >&2
    exit 1
}

# bench_init NAME: temp dir, results file bench/results/NAME-<UTC timestamp>.jsonl, exit trap.
bench_init() {
    BENCH_NAME=${1:?bench_init NAME}
    BENCH_TMP=$(mktemp -d "${TMPDIR:-/tmp}/outpost-bench-$BENCH_NAME.XXXXXX")
    : >"$BENCH_TMP/ports"
    mkdir -p "$BENCH_RESULTS_DIR"
    BENCH_RESULTS_FILE="$BENCH_RESULTS_DIR/$BENCH_NAME-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
    trap bench_cleanup EXIT
    # Turn signals into a normal exit so that the EXIT trap runs once.
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
    BENCH_DURATION=$(bench_duration_arg "$BENCH_DURATION")
    BENCH_WARMUP=$(bench_duration_arg "$BENCH_WARMUP")
}

# Plain numbers are seconds; anything else is passed to wrk as it is (10s, 1m, ...).
bench_duration_arg() {
    if [[ $1 =~ ^[0-9]+$ ]]; then printf '%ss\n' "$1"; else printf '%s\n' "$1"; fi
}

# Stops every process bench_spawn started (and the children they forked, such as nginx
# workers): SIGTERM, up to 5 s of grace, then SIGKILL. Removes the temp dir.
bench_cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    set +e # a failure here must not cut the cleanup short
    [[ -n $BENCH_WRK_PID ]] && bench_stop "$BENCH_WRK_PID"
    ((${#BENCH_PIDS[@]})) && bench_stop "${BENCH_PIDS[@]}"
    if [[ -n $BENCH_TMP && -d $BENCH_TMP ]]; then
        if [[ ${BENCH_KEEP_TMP:-0} == 1 ]]; then
            bench_log "temp dir kept: $BENCH_TMP"
        else
            rm -rf "$BENCH_TMP"
        fi
    fi
    exit "$rc"
}

bench_is_zombie() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} == Z ]]
}

# bench_children PID: direct children of PID, one per line.
bench_children() {
    pgrep -P "$1" 2>/dev/null || true
}

# bench_require_tools [TOOL...]: installs what is missing with apt-get (Debian).
# Without arguments: the tools every pass-through benchmark needs.
bench_require_tools() {
    local tools=("$@") tool pkg missing=() pkgs=()
    ((${#tools[@]})) || tools=(nginx wrk curl taskset getconf pgrep ss awk)
    for tool in "${tools[@]}"; do
        command -v "$tool" >/dev/null 2>&1 && continue
        # nginx lives in /usr/sbin, which a non-login shell may not have on PATH.
        [[ -x /usr/sbin/$tool ]] && { PATH="$PATH:/usr/sbin"; continue; }
        case $tool in
            nginx) pkg=nginx-light ;;
            taskset) pkg=util-linux ;;
            getconf) pkg=libc-bin ;;
            pgrep) pkg=procps ;;
            ss) pkg=iproute2 ;;
            awk) pkg=mawk ;;
            varnishd) pkg=varnish ;;
            callgrind_control) pkg=valgrind ;;
            *) pkg=$tool ;;
        esac
        missing+=("$tool")
        pkgs+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    bench_log "missing: ${missing[*]}; installing ${pkgs[*]} with apt-get"
    command -v apt-get >/dev/null 2>&1 || bench_die "no apt-get: install ${pkgs[*]} by hand"
    local sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null 2>&1 || bench_die "not root and no sudo: install ${pkgs[*]} by hand"
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update -qq >&2 || bench_die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${pkgs[@]}" >&2 ||
        bench_die "apt-get install ${pkgs[*]} failed"
    for tool in "${missing[@]}"; do
        command -v "$tool" >/dev/null 2>&1 || [[ -x /usr/sbin/$tool ]] ||
            bench_die "$tool still missing after installing its package"
    done
    [[ :$PATH: == *:/usr/sbin:* ]] || PATH="$PATH:/usr/sbin"
}

# bench_free_port: prints a TCP port on 127.0.0.1 that no socket uses, below the ephemeral
# range (so that no outgoing connection can take it meanwhile), never the same twice in a run.
bench_free_port() {
    local lo=20000 hi port tries
    read -r hi _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || hi=32768
    ((hi > lo + 1000)) || { lo=10000; hi=20000; }
    for ((tries = 0; tries < 200; tries++)); do
        port=$((lo + RANDOM % (hi - lo)))
        [[ -n $BENCH_TMP ]] && grep -qx "$port" "$BENCH_TMP/ports" && continue
        [[ -z $(ss -Htan "sport = :$port" 2>/dev/null) ]] || continue
        [[ -n $BENCH_TMP ]] && echo "$port" >>"$BENCH_TMP/ports"
        echo "$port"
        return 0
    done
    bench_die "no free port found"
}

# bench_wait_http URL [DEADLINE_S] [PID]: waits until GET URL answers 200. Gives up after
# DEADLINE_S seconds (default 10), or as soon as PID (if given) has exited. Returns 1 then.
bench_wait_http() {
    local url=${1:?bench_wait_http URL [DEADLINE_S] [PID]} deadline_s=${2:-10} pid=${3:-}
    local start=${EPOCHREALTIME/./} code
    while :; do
        code=$(curl -s -o /dev/null -w '%{http_code}' --noproxy '*' --max-time 1 "$url" 2>/dev/null) || true
        [[ $code == 200 ]] && return 0
        if [[ -n $pid ]] && { ! kill -0 "$pid" 2>/dev/null || bench_is_zombie "$pid"; }; then
            bench_log "pid $pid exited while waiting for $url"
            return 1
        fi
        if (((${EPOCHREALTIME/./} - start) / 1000000 >= deadline_s)); then
            bench_log "$url not ready after ${deadline_s}s (last status: ${code:-none})"
            return 1
        fi
        sleep 0.1
    done
}

# bench_clk_tck: clock ticks per second, the unit of utime/stime in /proc/PID/stat.
bench_clk_tck() {
    [[ -n $BENCH_CLK_TCK ]] || BENCH_CLK_TCK=$(getconf CLK_TCK)
    echo "$BENCH_CLK_TCK"
}

# bench_cpu_ticks PID...: user+system CPU time (fields 14 and 15 of /proc/PID/stat, in clock
# ticks) of the given processes, all their threads included, summed.
#
# /proc/PID/stat of a process (thread group) already reports the time of all its threads,
# including threads that have exited; /proc/PID/task/TID/stat is one thread's share of it.
# Adding both would count every thread twice, and adding only the task files would miss the
# threads that have exited (tokio's blocking pool, for one), so the process file is the one read.
# A PID that has gone away counts 0 (and is reported).
bench_cpu_ticks() {
    local pid stat rest total=0
    local -a f
    for pid in "$@"; do
        if ! stat=$(cat "/proc/$pid/stat" 2>/dev/null); then
            bench_log "bench_cpu_ticks: no process $pid"
            continue
        fi
        # Field 2 (comm) is in parentheses and may contain spaces: split after the last ')'.
        rest=${stat##*) }
        read -r -a f <<<"$rest"
        # f[0] is field 3 (state), so field 14 (utime) is f[11] and field 15 (stime) f[12].
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

# bench_build [--no-outpost]: `cargo build --release` of outpost-bench-origin (the origin, the
# hyper floor, the WebSocket load) and of outpost, unless BENCH_OUTPOST_BIN names an outpost
# binary to measure (or --no-outpost). Sets BENCH_BIN_DIR (where the release binaries are, under
# ${CARGO_TARGET_DIR:-target}) and BENCH_OUTPOST (the outpost binary to run). Returns 1 if the
# build failed.
bench_build() {
    local target_dir=${CARGO_TARGET_DIR:-$BENCH_REPO_DIR/target} packages=(-p outpost-bench-origin)
    [[ $target_dir == /* ]] || target_dir=$BENCH_REPO_DIR/$target_dir
    [[ ${1:-} == --no-outpost || -n ${BENCH_OUTPOST_BIN:-} ]] || packages=(-p outpost "${packages[@]}")
    bench_log "building: cargo build --release ${packages[*]}"
    (cd "$BENCH_REPO_DIR" && cargo build --release "${packages[@]}") || return 1
    BENCH_BIN_DIR=$target_dir/release
    BENCH_OUTPOST=${BENCH_OUTPOST_BIN:-$BENCH_BIN_DIR/outpost}
    [[ -x $BENCH_BIN_DIR/outpost-bench-origin ]] || bench_die "no $BENCH_BIN_DIR/outpost-bench-origin after the build"
}

# bench_spawn LOGNAME CMD...: starts CMD in the background, output to $BENCH_TMP/LOGNAME.log,
# registered to be stopped on exit. Sets BENCH_LAST_PID (the PID of CMD itself: taskset and
# exec replace themselves, so `bench_spawn x taskset -c 0 server` gives the server's PID).
bench_spawn() {
    local name=${1:?bench_spawn LOGNAME CMD...}
    shift
    "$@" >"$BENCH_TMP/$name.log" 2>&1 </dev/null &
    BENCH_LAST_PID=$!
    BENCH_PIDS+=("$BENCH_LAST_PID")
}

# bench_stop PID...: stops processes started with bench_spawn before the end of the run
# (their children too): SIGTERM, up to 5 s of grace, then SIGKILL.
bench_stop() {
    local pid child all=() deadline alive
    for pid in "$@"; do
        kill -0 "$pid" 2>/dev/null || continue
        all+=("$pid")
        for child in $(bench_children "$pid"); do all+=("$child"); done
    done
    ((${#all[@]})) || return 0
    kill -TERM "${all[@]}" 2>/dev/null || true # some may have exited meanwhile
    deadline=$((SECONDS + 5))
    while ((SECONDS < deadline)); do
        alive=0
        for pid in "${all[@]}"; do
            if kill -0 "$pid" 2>/dev/null && ! bench_is_zombie "$pid"; then alive=1; fi
        done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${all[@]}"; do
        if kill -0 "$pid" 2>/dev/null && ! bench_is_zombie "$pid"; then
            bench_log "pid $pid did not stop on SIGTERM, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    # Reap them; their exit status (143 for a SIGTERM) is not an error here.
    for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
    # Forget them: once reaped, a PID can be given to an unrelated process, which the
    # cleanup at exit must not signal.
    local kept=() p
    for p in "${BENCH_PIDS[@]}"; do
        [[ " $* " == *" $p "* ]] || kept+=("$p")
    done
    BENCH_PIDS=("${kept[@]}")
    return 0
}

# bench_log_tail LOGNAME: the last lines a spawned process wrote, for error messages.
bench_log_tail() {
    local file="$BENCH_TMP/$1.log"
    [[ -s $file ]] && sed 's/^/    | /' <(tail -n "${2:-20}" "$file") >&2
    return 0
}

# Latency as wrk prints it (123.45us, 1.20ms, 2.00s, 1.50m) to microseconds.
bench_to_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        m = (u == "us") ? 1 : (u == "ms") ? 1e3 : (u == "s") ? 1e6 : (u == "m") ? 6e7 : (u == "h") ? 3.6e9 : -1
        if (m < 0) { print "NaN"; exit 1 }
        printf "%.1f\n", n * m
    }'
}

# bench_wrk OUTFILE URL [DURATION]: one wrk run, pinned to $BENCH_CLIENT_CPU, with --latency
# (and -s "$BENCH_WRK_SCRIPT" -- "${BENCH_WRK_SCRIPT_ARGS[@]}" when a script is set: the URL
# then gives the host and port, the script may choose the paths) and the options in
# "${BENCH_WRK_EXTRA_ARGS[@]}" (request headers, say); raw output in OUTFILE.
# Sets BENCH_WRK_REQUESTS, BENCH_WRK_RPS, BENCH_WRK_P50_US, BENCH_WRK_P99_US,
# BENCH_WRK_ELAPSED_S, BENCH_WRK_ERRORS (socket errors) and BENCH_WRK_NON2XX. Returns 1 if wrk failed or its output could not be read.
bench_wrk() {
    local out=${1:?bench_wrk OUTFILE URL [DURATION]} url=${2:?} duration=${3:-$BENCH_DURATION}
    local script=() script_args=()
    if [[ -n $BENCH_WRK_SCRIPT ]]; then
        script=(-s "$BENCH_WRK_SCRIPT")
        # wrk passes what follows the URL to the script's init(); `--` ends wrk's options.
        script_args=(-- "${BENCH_WRK_SCRIPT_ARGS[@]}")
    fi
    # In the background and waited for, so that a signal to the script is handled at once
    # (bash runs traps only after a foreground command returns) and cleanup stops wrk too.
    taskset -c "$BENCH_CLIENT_CPU" wrk -t"$BENCH_THREADS" -c"$BENCH_CONNECTIONS" \
        -d"$duration" --latency "${script[@]}" "${BENCH_WRK_EXTRA_ARGS[@]}" "$url" "${script_args[@]}" >"$out" 2>&1 </dev/null &
    BENCH_WRK_PID=$!
    local rc=0
    wait "$BENCH_WRK_PID" || rc=$?
    BENCH_WRK_PID=""
    if ((rc != 0)); then
        bench_log "wrk failed (exit status $rc):"
        sed 's/^/    | /' "$out" >&2
        return 1
    fi
    local parsed
    # "  50%  312.00us", "  123456 requests in 10.00s, 1.10GB read", "Requests/sec: 12345.67",
    # "  Socket errors: connect 0, read 0, write 0, timeout 0", "  Non-2xx or 3xx responses: 12"
    parsed=$(awk '
        $1 == "50%" { p50 = $2 }
        $1 == "99%" { p99 = $2 }
        $2 == "requests" && $3 == "in" { req = $1; el = $4; sub(/,$/, "", el) }
        $1 == "Requests/sec:" { rps = $2 }
        /Socket errors:/ { gsub(/,/, ""); err = $4 + $6 + $8 + $10 }
        /Non-2xx or 3xx responses:/ { non2xx = $NF }
        END { printf "%s %s %s %s %s %d %d\n", req, rps, p50, p99, el, err, non2xx }
    ' "$out")
    local req rps p50 p99 el err non2xx
    read -r req rps p50 p99 el err non2xx <<<"$parsed"
    if [[ -z $req || -z $rps || -z $p50 || -z $p99 || -z $el ]]; then
        bench_log "could not parse wrk output:"
        sed 's/^/    | /' "$out" >&2
        return 1
    fi
    BENCH_WRK_REQUESTS=$req
    BENCH_WRK_RPS=$rps
    BENCH_WRK_P50_US=$(bench_to_us "$p50") || return 1
    BENCH_WRK_P99_US=$(bench_to_us "$p99") || return 1
    BENCH_WRK_ELAPSED_S=$(awk -v us="$(bench_to_us "$el")" 'BEGIN { printf "%.3f\n", us / 1e6 }')
    BENCH_WRK_ERRORS=$err
    BENCH_WRK_NON2XX=$non2xx
}

# bench_sys_ticks: "BUSY STEAL" for the whole machine, in clock ticks, from the first line of
# /proc/stat (busy = user + nice + system + irq + softirq; steal = time the hypervisor took).
bench_sys_ticks() {
    awk '$1 == "cpu" { printf "%.0f %.0f\n", $2 + $3 + $4 + $7 + $8, $9; exit }' /proc/stat
}

# bench_self_ticks: CPU of this script and of the children it has reaped (wrk, curl, the
# subshells of $(...)): fields 14 to 17 of /proc/$$/stat.
bench_self_ticks() {
    local stat rest
    local -a f
    stat=$(cat "/proc/$$/stat")
    rest=${stat##*) }
    read -r -a f <<<"$rest"
    echo $((f[11] + f[12] + f[13] + f[14]))
}

# bench_measure TARGET URL PID...: measures one server.
#   1. warm-up: wrk for $BENCH_WARMUP, results discarded (none if BENCH_WARMUP is 0);
#   2. CPU ticks of PIDs (bench_cpu_ticks), wrk for $BENCH_DURATION, CPU ticks again;
#   3. CPU-µs per request = (Δticks / CLK_TCK × 1e6) / requests; CPU % = Δticks / CLK_TCK /
#      wrk's elapsed time (how busy the server was: 100 = one core).
# Noise guard: the machine's busy time over the run (/proc/stat) minus what the PIDs, the
# processes in BENCH_CONTEXT_PIDS (the origin, say) and this script with wrk used is "other
# CPU": processes that are not part of the benchmark (a build, an editor, ...). It is reported,
# with a warning above 5 % of a core, and so is hypervisor steal time.
# Appends a row for bench_print_table, a JSON line to $BENCH_RESULTS_FILE, and sets
# BENCH_RESULT_CPU_US, BENCH_RESULT_P99_US, BENCH_RESULT_RPS for the caller.
# Extra JSON fields can be passed in BENCH_EXTRA_JSON (e.g. '"body_bytes":1024').
# Hooks, for figures taken around the measured run only (the origin's request count, say):
# BENCH_PRE_RUN is run (in this shell) after the warm-up, just before the first readings;
# BENCH_POST_RUN just after the last readings, so that neither is counted in the run. What
# BENCH_POST_RUN leaves in BENCH_POST_RUN_JSON is added to the JSON line too. If a hook
# fails, the measure fails (returns 1).
bench_measure() {
    local target=${1:?bench_measure TARGET URL PID...} url=${2:?}
    shift 2
    local pids=("$@") ctx=() clk pid p
    ((${#pids[@]})) || bench_die "bench_measure $target: no PID to measure"
    clk=$(bench_clk_tck)
    # Context processes that are not also measured (no double counting).
    for p in ${BENCH_CONTEXT_PIDS:-}; do
        [[ " ${pids[*]} " == *" $p "* ]] || ctx+=("$p")
    done

    if [[ $BENCH_WARMUP =~ ^0*(\.0*)?[a-z]*$ ]]; then
        bench_log "$target: no warm-up ($url)"
    else
        bench_log "$target: warm-up ${BENCH_WARMUP} ($url)"
        bench_wrk "$BENCH_TMP/wrk-$target-warmup.txt" "$url" "$BENCH_WARMUP" || return 1
    fi
    if [[ -n $BENCH_PRE_RUN ]]; then $BENCH_PRE_RUN || return 1; fi

    bench_log "$target: measuring ${BENCH_DURATION}, ${BENCH_CONNECTIONS} connections, ${BENCH_THREADS} wrk thread(s) on core ${BENCH_CLIENT_CPU}; CPU of pid(s) ${pids[*]}"
    local t0 t1 c0 c1 s0 s1 busy0 busy1 steal0 steal1
    read -r busy0 steal0 < <(bench_sys_ticks)
    s0=$(bench_self_ticks)
    c0=$(bench_cpu_ticks "${ctx[@]}")
    t0=$(bench_cpu_ticks "${pids[@]}")
    bench_wrk "$BENCH_TMP/wrk-$target.txt" "$url" || return 1
    t1=$(bench_cpu_ticks "${pids[@]}")
    c1=$(bench_cpu_ticks "${ctx[@]}")
    s1=$(bench_self_ticks)
    read -r busy1 steal1 < <(bench_sys_ticks)
    BENCH_POST_RUN_JSON=""
    if [[ -n $BENCH_POST_RUN ]]; then $BENCH_POST_RUN || return 1; fi
    local died=0
    for pid in "${pids[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null || bench_is_zombie "$pid"; then
            bench_log "$target: WARNING: pid $pid died during the run: no CPU figure"
            died=1
        fi
    done

    local dticks=$((t1 - t0)) cpu_us cpu_pct other_pct steal_pct
    local dother=$((busy1 - busy0 - dticks - (c1 - c0) - (s1 - s0)))
    ((died == 0)) || dticks=-1
    cpu_us=$(awk -v d="$dticks" -v c="$clk" -v r="$BENCH_WRK_REQUESTS" \
        'BEGIN { if (r > 0 && d >= 0) printf "%.2f\n", d / c * 1e6 / r; else print "NaN" }')
    cpu_pct=$(awk -v d="$dticks" -v c="$clk" -v e="$BENCH_WRK_ELAPSED_S" \
        'BEGIN { if (e > 0 && d >= 0) printf "%.1f\n", d / c / e * 100; else print "NaN" }')
    # Tick sampling makes this a few % either way: negative means "nothing else ran".
    other_pct=$(awk -v d="$dother" -v c="$clk" -v e="$BENCH_WRK_ELAPSED_S" \
        'BEGIN { v = (e > 0) ? d / c / e * 100 : 0; if (v < 0) v = 0; printf "%.1f\n", v }')
    steal_pct=$(awk -v d="$((steal1 - steal0))" -v c="$clk" -v e="$BENCH_WRK_ELAPSED_S" \
        'BEGIN { printf "%.1f\n", (e > 0) ? d / c / e * 100 : 0 }')

    if ((BENCH_WRK_ERRORS > 0 || BENCH_WRK_NON2XX > 0)); then
        bench_log "$target: WARNING: ${BENCH_WRK_ERRORS} socket errors, ${BENCH_WRK_NON2XX} non-2xx/3xx responses"
    fi
    if [[ $cpu_pct != NaN ]] && awk -v p="$cpu_pct" 'BEGIN { exit !(p < 1) }'; then
        bench_log "$target: WARNING: pid(s) ${pids[*]} used almost no CPU while serving: are they the processes that serve?"
    fi
    if awk -v p="$other_pct" 'BEGIN { exit !(p > 5) }'; then
        bench_log "$target: WARNING: ${other_pct}% of a core went to processes outside the benchmark during the run: figures are disturbed, run again on a quiet machine"
    fi
    if awk -v p="$steal_pct" 'BEGIN { exit !(p > 2) }'; then
        bench_log "$target: WARNING: hypervisor steal time ${steal_pct}% of a core during the run"
    fi

    BENCH_RESULT_CPU_US=$cpu_us
    BENCH_RESULT_P99_US=$BENCH_WRK_P99_US
    BENCH_RESULT_RPS=$BENCH_WRK_RPS
    BENCH_ROWS+=("$(printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s' "$target" "$BENCH_WRK_REQUESTS" \
        "$BENCH_WRK_RPS" "$BENCH_WRK_P50_US" "$BENCH_WRK_P99_US" "$cpu_us" "$cpu_pct" \
        "$((BENCH_WRK_ERRORS + BENCH_WRK_NON2XX))" "$other_pct")")

    local extra=${BENCH_EXTRA_JSON:-}
    if [[ -n $BENCH_POST_RUN_JSON ]]; then extra="${extra:+$extra,}$BENCH_POST_RUN_JSON"; fi
    printf '{"bench":"%s","target":"%s","time":"%s","git":"%s","kernel":"%s","requests":%s,"rps":%s,"p50_us":%s,"p99_us":%s,"cpu_ticks":%s,"clk_tck":%s,"cpu_us_per_req":%s,"cpu_pct":%s,"other_cpu_pct":%s,"steal_pct":%s,"elapsed_s":%s,"socket_errors":%s,"non_2xx":%s,"duration":"%s","warmup":"%s","connections":%s,"wrk_threads":%s,"client_cpu":"%s","pids":"%s"%s}\n' \
        "$BENCH_NAME" "$target" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(bench_git_rev)" "$(uname -r)" \
        "$BENCH_WRK_REQUESTS" "$BENCH_WRK_RPS" "$BENCH_WRK_P50_US" "$BENCH_WRK_P99_US" \
        "$( ((dticks >= 0)) && echo "$dticks" || echo null)" "$clk" "$(bench_json_num "$cpu_us")" "$(bench_json_num "$cpu_pct")" \
        "$other_pct" "$steal_pct" \
        "$BENCH_WRK_ELAPSED_S" "$BENCH_WRK_ERRORS" "$BENCH_WRK_NON2XX" "$BENCH_DURATION" \
        "$BENCH_WARMUP" "$BENCH_CONNECTIONS" "$BENCH_THREADS" "$BENCH_CLIENT_CPU" "${pids[*]}" \
        "${extra:+,$extra}" >>"$BENCH_RESULTS_FILE"
}

bench_json_num() { if [[ $1 == NaN ]]; then echo null; else echo "$1"; fi; }

bench_git_rev() {
    local rev
    rev=$(git -C "$BENCH_REPO_DIR" rev-parse --short HEAD 2>/dev/null) || rev=none
    if [[ -n $(git -C "$BENCH_REPO_DIR" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
        rev="$rev-dirty"
    fi
    echo "$rev"
}

# bench_add_skipped TARGET REASON: a row saying the target was not measured.
bench_add_skipped() {
    BENCH_ROWS+=("$(printf '%s\tskipped: %s' "$1" "$2")")
}

# bench_print_table: the rows so far, aligned (the target column is 10 wide, or as wide as
# the longest target name).
bench_print_table() {
    local row w=10
    local -a c
    for row in "${BENCH_ROWS[@]}"; do
        row=${row%%$'\t'*}
        ((${#row} <= w)) || w=${#row}
    done
    # Widths of the headers with a µ are one more: printf counts bytes, µ is two.
    printf "%-${w}s %10s %10s %10s %10s %13s %7s %7s %8s\n" \
        target requests req/s 'p50 µs' 'p99 µs' 'CPU-µs/req' 'CPU %' errors 'other %'
    for row in "${BENCH_ROWS[@]}"; do
        IFS=$'\t' read -r -a c <<<"$row"
        if [[ ${c[1]} == skipped:* ]]; then
            printf "%-${w}s %s\n" "${c[0]}" "${c[1]}"
        else
            printf "%-${w}s %10s %10.0f %9.0f %9.0f %12.2f %7.1f %7s %8.1f\n" "${c[@]}"
        fi
    done
}

# bench_ratio A B: A / B with 2 decimals, "n/a" when either is missing.
bench_ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN {
        if (a == "" || b == "" || a == "NaN" || b == "NaN" || b + 0 == 0) print "n/a"
        else printf "%.2f\n", a / b
    }'
}

# bench_nginx_head DIR: the start of every benchmark's nginx.conf up to inside `http {`: one
# worker, pid/logs/temp paths in DIR, no access log. The caller appends its server block and
# the closing brace.
bench_nginx_head() {
    local dir=$1
    cat <<EOF
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;

events {
    worker_connections 1024;
}

http {
    access_log off;
    client_body_temp_path $dir/client_body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
EOF
}

# bench_nginx_proxy LISTEN_PORT ORIGIN_PORT: the server block of a pass-through nginx, with
# upstream keepalive (the caller closes `http {`).
bench_nginx_proxy() {
    cat <<EOF
    upstream origin {
        server 127.0.0.1:$2;
        keepalive 64;
    }

    server {
        listen 127.0.0.1:$1;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
EOF
}

# bench_outpost_head PROXY_PORT ADMIN_PORT [NODE_ID] [DATA_DIR] [ADMIN_TOKEN]: the start of every
# benchmark's outpost.toml: node NODE_ID (default bench-1, with data_dir DATA_DIR when given), one
# listener, the admin listener (with ADMIN_TOKEN when given), no access log.
bench_outpost_head() {
    local id=${3:-bench-1} data_dir=${4:-} token=${5:-}
    cat <<EOF
version = 1

[node]
id = "$id"
region = "local"
location = { lat = 0.0, lon = 0.0 }
EOF
    [[ -z $data_dir ]] || echo "data_dir = \"$data_dir\""
    cat <<EOF

[[listeners]]
addr = "127.0.0.1:$1"

[admin]
addr = "127.0.0.1:$2"
EOF
    [[ -z $token ]] || echo "token = \"$token\""
    cat <<EOF

[log]
access_log = false
EOF
}

# bench_outpost_origin ORIGIN_PORT [NAME]: the origin group NAME (default `bench`), one endpoint.
bench_outpost_origin() {
    local name=${2:-bench}
    cat <<EOF

[origins.$name]
[[origins.$name.endpoints]]
url = "http://127.0.0.1:$1"
region = "local"
location = { lat = 0.0, lon = 0.0 }
EOF
}

# bench_outpost_route: the route `bench`: every path to the origin group `bench`.
bench_outpost_route() {
    cat <<EOF

[[routes]]
name = "bench"
path_prefix = "/"
origin = "bench"
EOF
}

# bench_outpost_passthrough PROXY_PORT ADMIN_PORT ORIGIN_PORT: a whole outpost.toml for the
# pass-through benchmarks: bench_outpost_head, the origin group `bench`, the route `bench`.
bench_outpost_passthrough() {
    bench_outpost_head "$1" "$2"
    bench_outpost_origin "$3"
    bench_outpost_route
}

# bench_check_fail MESSAGE: records a failed check (printed at the end by the script; it exits 1).
BENCH_CHECK_FAILURES=()
bench_check_fail() {
    bench_log "CHECK FAILED: $*"
    BENCH_CHECK_FAILURES+=("$*")
}

# bench_check_pinned NAME PID: a failed check unless PID runs on $BENCH_SERVER_CPU alone.
bench_check_pinned() {
    local name=$1 pid=$2 aff
    aff=$(taskset -cp "$pid" 2>/dev/null | awk -F': ' '{ print $2 }')
    [[ $aff == "$BENCH_SERVER_CPU" ]] || bench_check_fail "$name (pid $pid) runs on cores '$aff', not on core $BENCH_SERVER_CPU alone"
}

# bench_data_disk WHY: the temp dir must be on a disk (durable writes are measured there): dies
# on tmpfs with WHY; sets BENCH_FS_TYPE, BENCH_FS_SOURCE, BENCH_DISK_NAME (the block device whose
# flushes /proc/diskstats counts, field 19, kernel >= 5.5; a partition is mapped to its disk;
# empty when unknown), BENCH_WRITE_CACHE and BENCH_FSYNC_PROBE (median of 200 4 KiB writes +
# fdatasync there), and logs them.
bench_data_disk() {
    local why=${1:-durable writes there would cost nothing} dev_id sys
    BENCH_FS_TYPE=$(df --output=fstype "$BENCH_TMP" | tail -n 1)
    BENCH_FS_SOURCE=$(df --output=source "$BENCH_TMP" | tail -n 1)
    case $BENCH_FS_TYPE in
        tmpfs | ramfs) bench_die "the temp dir $BENCH_TMP is on $BENCH_FS_TYPE: $why; set BENCH_DATA_PARENT to a directory on a disk" ;;
    esac
    BENCH_DISK_NAME=""
    dev_id=$(stat -c '%Hd:%Ld' "$BENCH_TMP" 2>/dev/null) || dev_id=""
    if [[ -n $dev_id && -e /sys/dev/block/$dev_id ]]; then
        sys=$(readlink -f "/sys/dev/block/$dev_id")
        [[ -e $sys/partition ]] && sys=$(dirname "$sys")
        BENCH_DISK_NAME=$(basename "$sys")
        awk -v d="$BENCH_DISK_NAME" '$3 == d && NF >= 20 { found = 1 } END { exit !found }' /proc/diskstats || BENCH_DISK_NAME=""
    fi
    BENCH_WRITE_CACHE=""
    [[ -n $BENCH_DISK_NAME && -r /sys/block/$BENCH_DISK_NAME/queue/write_cache ]] &&
        BENCH_WRITE_CACHE=$(cat "/sys/block/$BENCH_DISK_NAME/queue/write_cache")
    BENCH_FSYNC_PROBE=$(python3 - "$BENCH_TMP/fsync-probe" <<'EOF' 2>/dev/null || echo "n/a"
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)
times = []
for i in range(200):
    os.pwrite(fd, os.urandom(4096), 0)
    t = time.perf_counter()
    os.fdatasync(fd)
    times.append(time.perf_counter() - t)
os.close(fd)
os.unlink(sys.argv[1])
times.sort()
print(f"{times[100] * 1e6:.0f} µs (p90 {times[180] * 1e6:.0f} µs)")
EOF
)
    bench_log "data dir parent $BENCH_TMP: $BENCH_FS_TYPE on $BENCH_FS_SOURCE${BENCH_DISK_NAME:+ (disk $BENCH_DISK_NAME, write cache: ${BENCH_WRITE_CACHE:-?})}; 4 KiB write + fdatasync: median $BENCH_FSYNC_PROBE"
    [[ -n $BENCH_DISK_NAME ]] || bench_log "no block device found for $BENCH_TMP in /proc/diskstats: disk flushes are not counted"
}

# bench_disk_flushes: the flush count of BENCH_DISK_NAME so far (0 when unknown).
bench_disk_flushes() {
    if [[ -z ${BENCH_DISK_NAME:-} ]]; then echo 0; else awk -v d="$BENCH_DISK_NAME" '$3 == d { print $19; exit }' /proc/diskstats; fi
}
