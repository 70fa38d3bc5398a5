#!/usr/bin/env bash
# bench/guard.sh: the edge-guard benchmark. One origin, one outpost process with one route per
# guard configuration, the routes measured one after the other with wrk in the same run:
#
#   none                  /none/       pass-through, no guard (the baseline)
#   jwt-rs256             /rs256/      bearer JWT required, RS256 (RSA 2048)
#   jwt-es256             /es256/      bearer JWT required, ES256 (P-256)
#   jwt-eddsa             /eddsa/      bearer JWT required, EdDSA (Ed25519)
#   jwt-eddsa+ratelimit   /eddsa-rl/   EdDSA JWT, and two GCRA rate limits (by sub, by ip),
#                                      too high ever to refuse a request
#   jwt-eddsa+identity    /eddsa-id/   EdDSA JWT, and forward_identity: the node signs an
#                                      Ed25519 x-outpost-identity for every request
#
# Every JWT route checks iss and aud. The tokens are signed here with the test keys in
# crates/outpost-guard/tests/keys (claims iss, aud, sub, iat, exp = now + BENCH_TOKEN_TTL), and
# every request carries one; on `none` the EdDSA tokens, unchecked there, so that every target
# gets the same request bytes and the difference to `none` is the guard's work alone.
#
# The node remembers the tokens it has verified (per route, keyed by the whole token), so
# what a request costs depends on whether its token is new to the node. Two phases
# (BENCH_PHASES), each over the targets:
#
#   reuse   one token per algorithm, sent with every request (wrk -H): after the first request
#           the node finds it among the tokens it has verified, as for a client that keeps
#           its token. Warm-up, then BENCH_DURATION. Tokens made with openssl.
#   fresh   a token never sent before with every request (wrk/tokens.lua over BENCH_FRESH_TOKENS
#           tokens per algorithm, each with a jti of its own, made by tokens.py with python3's
#           `cryptography`): the full signature check every time, as for a stream of new
#           clients. BENCH_FRESH_DURATION, no warm-up (the reuse phase warmed the process). If
#           a run outlasts its tokens, they repeat: the script says so.
#
# Before a route is measured the script checks that it answers 200 with the origin's body
# with its token, and for a JWT route 401 without a token and with a tampered signature (the
# guard is on); for the rate-limited route that RateLimit-Policy comes back, for the identity
# route (with python3) that an origin receives x-outpost-identity. A route that fails its
# checks is skipped with the reason, the others are measured.
#
# Pinning (2 cores): outpost alone on core 0; the origin and wrk share core 1. For each
# target: requests, req/s, p50/p99 latency, outpost's CPU per request (utime+stime from /proc,
# see bench/lib.sh). Then each target against `none`: CPU ratio, the guard's cost in CPU-µs
# per request (the difference), p99 and req/s ratios.
#
# Settings (environment), besides those of bench/lib.sh (BENCH_DURATION, BENCH_CONNECTIONS, ...):
#   BENCH_TARGETS          targets to measure, comma-separated, in that order
#                          (default none,jwt-rs256,jwt-es256,jwt-eddsa,jwt-eddsa+ratelimit,jwt-eddsa+identity)
#   BENCH_PHASES           phases, comma-separated                (default reuse,fresh)
#   BENCH_FRESH_DURATION   each measured run of the fresh phase   (default 5s)
#   BENCH_FRESH_TOKENS     tokens per algorithm for the fresh phase (default 100000)
#   BENCH_OUTPOST_BIN      an outpost binary to measure instead of building one
#   BENCH_BODY_BYTES       size of the origin's response body   (default 1024)
#   BENCH_TOKEN_TTL        seconds until the tokens expire       (default 86400)
#   BENCH_SERVER_CPU       core of outpost                       (default 0)
#   BENCH_ORIGIN_CPU       core of the origin                    (default 1)
#   BENCH_READY_TIMEOUT    seconds outpost gets to become ready  (default 20)
#   BENCH_PYTHON           python with `cryptography`, for tokens.py (default: the repo's
#                          .venv/bin/python if it has it, else python3)
#
# See bench/README.md.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ALL_TARGETS=(none jwt-rs256 jwt-es256 jwt-eddsa jwt-eddsa+ratelimit jwt-eddsa+identity)
: "${BENCH_TARGETS:=$(
    IFS=,
    echo "${ALL_TARGETS[*]}"
)}"
: "${BENCH_BODY_BYTES:=1024}"
: "${BENCH_TOKEN_TTL:=86400}"
: "${BENCH_SERVER_CPU:=0}"
: "${BENCH_ORIGIN_CPU:=1}"
: "${BENCH_READY_TIMEOUT:=20}"
: "${BENCH_PHASES:=reuse,fresh}"
: "${BENCH_FRESH_DURATION:=5s}"
: "${BENCH_FRESH_TOKENS:=100000}"

KEY_DIR=$BENCH_REPO_DIR/crates/outpost-guard/tests/keys
ISSUER=https://idp.bench
AUDIENCE=bench
SUBJECT=bench-user

# Per target: path prefix of its route, JWT algorithm ("" for none), private key (token) and
# public key (route config).
declare -A route_path=(
    [none]=/none [jwt-rs256]=/rs256 [jwt-es256]=/es256 [jwt-eddsa]=/eddsa
    [jwt-eddsa+ratelimit]=/eddsa-rl [jwt-eddsa+identity]=/eddsa-id
)
declare -A target_alg=(
    [none]="" [jwt-rs256]=RS256 [jwt-es256]=ES256 [jwt-eddsa]=EdDSA
    [jwt-eddsa+ratelimit]=EdDSA [jwt-eddsa+identity]=EdDSA
)
declare -A alg_private=([RS256]=$KEY_DIR/rsa.key [ES256]=$KEY_DIR/ec256.pk8 [EdDSA]=$KEY_DIR/ed.key)
declare -A alg_public=([RS256]=$KEY_DIR/rsa.pub [ES256]=$KEY_DIR/ec256.pub [EdDSA]=$KEY_DIR/ed.pub)

# --- settings ----------------------------------------------------------------------------
targets=()
IFS=, read -r -a target_list <<<"$BENCH_TARGETS"
for t in "${target_list[@]}"; do
    [[ -n $t ]] || continue
    [[ -n ${route_path[$t]+x} ]] || bench_die "BENCH_TARGETS: unknown target '$t' (${ALL_TARGETS[*]})"
    targets+=("$t")
done
((${#targets[@]})) || bench_die "BENCH_TARGETS: no target to measure"
phases=()
IFS=, read -r -a phase_list <<<"$BENCH_PHASES"
for p in "${phase_list[@]}"; do
    case $p in
        reuse | fresh) phases+=("$p") ;;
        "") ;;
        *) bench_die "BENCH_PHASES: unknown phase '$p' (reuse, fresh)" ;;
    esac
done
((${#phases[@]})) || bench_die "BENCH_PHASES: no phase to run"
for n in "$BENCH_BODY_BYTES" "$BENCH_TOKEN_TTL" "$BENCH_FRESH_TOKENS"; do
    [[ $n =~ ^[0-9]+$ ]] || bench_die "not a whole number: '$n' (BENCH_BODY_BYTES, BENCH_TOKEN_TTL, BENCH_FRESH_TOKENS)"
done
((BENCH_FRESH_TOKENS > 0)) || bench_die "BENCH_FRESH_TOKENS must be > 0"
((BENCH_TOKEN_TTL >= 60)) || bench_die "BENCH_TOKEN_TTL: at least 60 seconds, or the tokens expire during the run"

bench_init guard
BENCH_FRESH_DURATION=$(bench_duration_arg "$BENCH_FRESH_DURATION")
bench_require_tools wrk curl taskset getconf pgrep ss awk openssl
base_extra="\"body_bytes\":$BENCH_BODY_BYTES,\"server_cpu\":\"$BENCH_SERVER_CPU\",\"origin_cpu\":\"$BENCH_ORIGIN_CPU\""

taskset -c "$BENCH_SERVER_CPU,$BENCH_ORIGIN_CPU,$BENCH_CLIENT_CPU" true 2>/dev/null ||
    bench_die "cores $BENCH_SERVER_CPU, $BENCH_ORIGIN_CPU and $BENCH_CLIENT_CPU are not all usable here (taskset)"

# --- build -------------------------------------------------------------------------------
bench_build || bench_die "cargo build failed"
origin_bin=$BENCH_BIN_DIR/outpost-bench-origin
outpost_bin=$BENCH_OUTPOST

bench_log "kernel $(uname -r), $(nproc) cores, CLK_TCK $(bench_clk_tck), $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
bench_log "pinning: outpost on core $BENCH_SERVER_CPU, origin on core $BENCH_ORIGIN_CPU, wrk on core $BENCH_CLIENT_CPU"

# --- tokens ------------------------------------------------------------------------------
# b64url: stdin in unpadded base64url (RFC 7515), on one line.
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '=\n'; }

# der_to_jose BYTES: an ECDSA signature from DER (SEQUENCE of two INTEGERs, what openssl
# writes) to JOSE's r || s, each BYTES long, big-endian (RFC 7518 §3.4). stdin to stdout.
der_to_jose() {
    local n=$1 hex out="" ints
    ints=$(openssl asn1parse -inform DER | awk -F: '/ INTEGER / { print $NF }') || return 1
    [[ $(grep -c . <<<"$ints") == 2 ]] || return 1
    while read -r hex; do
        [[ $hex =~ ^[0-9A-Fa-f]+$ ]] || return 1
        while ((${#hex} < 2 * n)); do hex=0$hex; done
        hex=${hex: -$((2 * n))}
        out+=$hex
    done <<<"$ints"
    # Hex to bytes: printf's %b understands \xHH.
    local esc="" i
    for ((i = 0; i < ${#out}; i += 2)); do esc+="\\x${out:i:2}"; done
    printf '%b' "$esc"
}

# make_token ALG PRIVATE_KEY: a signed JWT (JWS compact) with this run's claims.
make_token() {
    local alg=$1 key=$2 now header payload input sig
    now=$(date +%s)
    header=$(printf '{"alg":"%s","typ":"JWT"}' "$alg" | b64url)
    payload=$(printf '{"iss":"%s","aud":"%s","sub":"%s","iat":%d,"exp":%d}' \
        "$ISSUER" "$AUDIENCE" "$SUBJECT" "$now" "$((now + BENCH_TOKEN_TTL))" | b64url)
    input=$header.$payload
    printf '%s' "$input" >"$BENCH_TMP/jwt-input"
    case $alg in
        RS256) sig=$(openssl dgst -sha256 -sign "$key" -binary "$BENCH_TMP/jwt-input" | b64url) ;;
        ES256) sig=$(openssl dgst -sha256 -sign "$key" -binary "$BENCH_TMP/jwt-input" | der_to_jose 32 | b64url) ;;
        EdDSA) sig=$(openssl pkeyutl -sign -rawin -inkey "$key" -in "$BENCH_TMP/jwt-input" | b64url) ;;
        *) return 1 ;;
    esac
    [[ -n $sig ]] || return 1
    printf '%s.%s\n' "$input" "$sig"
}

# tamper TOKEN: the token with one character of its signature changed (well inside it, so
# that it changes signature bits, not base64 padding).
tamper() {
    local t=$1 i c
    i=$((${#t} - 10))
    c=${t:i:1}
    if [[ $c == A ]]; then c=B; else c=A; fi
    printf '%s%s%s\n' "${t:0:i}" "$c" "${t:i+1}"
}

declare -A token=() token_error=()
for alg in RS256 ES256 EdDSA; do
    if tok=$(make_token "$alg" "${alg_private[$alg]}" 2>"$BENCH_TMP/token-$alg.err") && [[ -n $tok ]]; then
        token[$alg]=$tok
        bench_log "token $alg: ${#tok} bytes"
    else
        token_error[$alg]="could not make an $alg token with openssl ($(head -n 1 "$BENCH_TMP/token-$alg.err"))"
        bench_log "${token_error[$alg]}"
    fi
done

# The fresh phase's tokens: BENCH_FRESH_TOKENS for wrk, plus one more for the check before
# the run (a token the run never sends, so that the check leaves nothing in the node's
# memory that the run could find). `none` gets the EdDSA ones.
declare -A fresh_file=() fresh_check=() fresh_error=()
if [[ " ${phases[*]} " == *" fresh "* ]]; then
    python=${BENCH_PYTHON:-}
    if [[ -z $python ]]; then
        for candidate in "$BENCH_REPO_DIR/.venv/bin/python" python3; do
            if "$candidate" -c 'import cryptography' >/dev/null 2>&1; then
                python=$candidate
                break
            fi
        done
    fi
    declare -A fresh_algs=()
    for t in "${targets[@]}"; do
        alg=${target_alg[$t]}
        fresh_algs[${alg:-EdDSA}]=1
    done
    for alg in RS256 ES256 EdDSA; do
        [[ -n ${fresh_algs[$alg]:-} ]] || continue
        if [[ -z $python ]]; then
            fresh_error[$alg]="no python with the cryptography package to make the fresh tokens (BENCH_PYTHON)"
            continue
        fi
        bench_log "fresh phase: making $BENCH_FRESH_TOKENS $alg tokens with $python bench/tokens.py"
        all_file=$BENCH_TMP/fresh-$alg.all
        start_s=$SECONDS
        if "$python" "$BENCH_LIB_DIR/tokens.py" "$alg" "${alg_private[$alg]}" "$((BENCH_FRESH_TOKENS + 1))" "$all_file" \
            --iss "$ISSUER" --aud "$AUDIENCE" --sub "$SUBJECT" --ttl "$BENCH_TOKEN_TTL" 2>"$BENCH_TMP/fresh-$alg.err" &&
            (($(wc -l <"$all_file") == BENCH_FRESH_TOKENS + 1)); then
            fresh_file[$alg]=$BENCH_TMP/fresh-$alg.txt
            head -n "$BENCH_FRESH_TOKENS" "$all_file" >"${fresh_file[$alg]}"
            fresh_check[$alg]=$(tail -n 1 "$all_file")
            rm -f "$all_file"
            bench_log "fresh phase: $alg tokens made in $((SECONDS - start_s)) s"
        else
            fresh_error[$alg]="bench/tokens.py could not make the $alg tokens ($(tail -n 1 "$BENCH_TMP/fresh-$alg.err"))"
            bench_log "fresh phase: ${fresh_error[$alg]}"
        fi
    done
fi

# --- origin ------------------------------------------------------------------------------
# check_response URL EXPECT [CURL ARGS...]: GET URL; EXPECT is "200 BYTES" (status and body
# size) or a status alone. Prints what came back; returns 1 if it is not what was expected.
check_response() {
    local url=$1 want=$2 got
    shift 2
    got=$(curl -s --noproxy '*' --max-time 2 -o /dev/null -w '%{http_code} %{size_download}' "$@" "$url") || true
    [[ $want == *" "* ]] || got=${got%% *}
    echo "${got:-nothing}"
    [[ $got == "$want" ]]
}

origin_port=$(bench_free_port)
origin_url="http://127.0.0.1:$origin_port/"
bench_spawn origin taskset -c "$BENCH_ORIGIN_CPU" "$origin_bin" "127.0.0.1:$origin_port" "$BENCH_BODY_BYTES"
origin_pid=$BENCH_LAST_PID
if ! bench_wait_http "$origin_url" 10 "$origin_pid"; then
    bench_log_tail origin
    bench_die "the origin did not start"
fi
got=$(check_response "$origin_url" "200 $BENCH_BODY_BYTES") ||
    bench_die "the origin answered '$got' (status and body size), expected '200 $BENCH_BODY_BYTES'"
# Busy during every run but not measured: not noise from elsewhere.
BENCH_CONTEXT_PIDS=$origin_pid

# The identity check: a tiny origin (python3) that writes down the headers of the request it
# gets, behind a route of its own with forward_identity. Gone before the measured runs.
probe_port=""
probe_pid=""
probe_file=$BENCH_TMP/probe-headers.txt
if [[ " ${targets[*]} " == *" jwt-eddsa+identity "* ]] && command -v python3 >/dev/null 2>&1; then
    probe_port=$(bench_free_port)
    # shellcheck disable=SC2016 # Python, not shell
    bench_spawn probe taskset -c "$BENCH_ORIGIN_CPU" python3 -c '
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with open(sys.argv[2], "w") as f:
            f.write(str(self.headers))
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
' "$probe_port" "$probe_file"
    probe_pid=$BENCH_LAST_PID
    if ! bench_wait_http "http://127.0.0.1:$probe_port/" 10 "$probe_pid"; then
        bench_log_tail probe
        bench_log "the identity probe origin did not start: x-outpost-identity will not be checked"
        bench_stop "$probe_pid"
        probe_port=""
        probe_pid=""
    fi
    rm -f "$probe_file"
fi

# --- outpost -----------------------------------------------------------------------------
proxy_port=$(bench_free_port)
admin_port=$(bench_free_port)
base_url="http://127.0.0.1:$proxy_port"
config=$BENCH_TMP/outpost.toml

# auth_section ALG: a route's [routes.auth] table.
auth_section() {
    cat <<EOF
[routes.auth]
algorithms = ["$1"]
key_files = ["${alg_public[$1]}"]
issuer = "$ISSUER"
audience = ["$AUDIENCE"]
EOF
}

{
    bench_outpost_head "$proxy_port" "$admin_port"
    bench_outpost_origin "$origin_port"
    [[ -z $probe_port ]] || bench_outpost_origin "$probe_port" probe
    # Every route is in the config, measured or not: the route table is the same whatever
    # BENCH_TARGETS says. Route names may not contain '+': jwt-eddsa-ratelimit, ...
    for t in "${ALL_TARGETS[@]}"; do
        printf '\n[[routes]]\nname = "%s"\npath_prefix = "%s"\norigin = "bench"\n' "${t//+/-}" "${route_path[$t]}"
        [[ $t == jwt-eddsa+identity ]] && echo "forward_identity = true"
        [[ -n ${target_alg[$t]} ]] && auth_section "${target_alg[$t]}"
        if [[ $t == jwt-eddsa+ratelimit ]]; then
            # [[routes.rate_limits]] belongs to the last [[routes]]. Never reached: 1e8/s.
            cat <<EOF
[[routes.rate_limits]]
name = "per-user"
key = "sub"
rate = 100000000
per = "1s"
[[routes.rate_limits]]
name = "per-ip"
key = "ip"
rate = 100000000
per = "1s"
EOF
        fi
    done
    if [[ -n $probe_port ]]; then
        printf '\n[[routes]]\nname = "identity-probe"\npath_prefix = "/identity-probe"\norigin = "probe"\nforward_identity = true\n'
        auth_section EdDSA
    fi
} >"$config"

skip_all=""
if [[ ! -x $outpost_bin ]]; then
    skip_all="no outpost binary at $outpost_bin"
else
    # Pinned to one core: tokio sizes its worker pool from the affinity mask, so 1 worker.
    bench_spawn outpost taskset -c "$BENCH_SERVER_CPU" "$outpost_bin" serve --config "$config"
    outpost_pid=$BENCH_LAST_PID
    if ! bench_wait_http "http://127.0.0.1:$admin_port/readyz" "$BENCH_READY_TIMEOUT" "$outpost_pid"; then
        if kill -0 "$outpost_pid" 2>/dev/null && ! bench_is_zombie "$outpost_pid"; then
            skip_all="outpost serve not ready (GET /readyz != 200) within ${BENCH_READY_TIMEOUT}s"
        else
            status=0
            wait "$outpost_pid" || status=$?
            skip_all="outpost serve exited (status $status) before it was ready"
        fi
        bench_log "outpost: $skip_all; its output:"
        bench_log_tail outpost
    fi
fi

# The identity check, before the measured runs; then the probe origin goes away.
identity_check=""
if [[ -z $skip_all && -n $probe_port ]]; then
    got=$(check_response "$base_url/identity-probe/x" 200 -H "Authorization: Bearer ${token[EdDSA]:-}") || true
    ident=""
    [[ -s $probe_file ]] && ident=$(awk 'tolower($1) == "x-outpost-identity:" { print $2 }' "$probe_file" | tr -d '\r')
    if [[ $got == 200 && $ident =~ ^[A-Za-z0-9_-]+\.([A-Za-z0-9_-]+)\.[A-Za-z0-9_-]+$ ]]; then
        claims=${BASH_REMATCH[1]}
        while ((${#claims} % 4)); do claims+="="; done
        claims=$(tr '_-' '/+' <<<"$claims" | openssl base64 -d -A 2>/dev/null) || claims="?"
        bench_log "identity probe: the origin got x-outpost-identity (${#ident} bytes), claims: $claims"
    else
        identity_check="the origin behind a forward_identity route got no x-outpost-identity (status $got)"
        bench_log "identity probe: $identity_check"
    fi
fi
if [[ -n $probe_pid ]]; then bench_stop "$probe_pid"; fi
[[ -n $probe_port ]] || bench_log "identity probe: not run (no python3): x-outpost-identity is not checked"

# check_target TARGET: the checks before measuring; sets skip_reason when one fails.
check_target() {
    local t=$1 alg=${target_alg[$1]} url=$base_url${route_path[$1]}/bench tok got hdrs
    # `none` is sent the EdDSA token (unchecked there) like the EdDSA routes.
    tok=${token[${alg:-EdDSA}]:-}
    if [[ -z $tok ]]; then
        skip_reason=${token_error[${alg:-EdDSA}]}
        return 1
    fi
    if ! got=$(check_response "$url" "200 $BENCH_BODY_BYTES" -H "Authorization: Bearer $tok"); then
        skip_reason="with its token: '$got' (status and body size), expected '200 $BENCH_BODY_BYTES'"
        return 1
    fi
    if [[ -n $alg ]]; then
        if ! got=$(check_response "$url" 401); then
            skip_reason="without a token: $got, expected 401 (is the guard on?)"
            return 1
        fi
        if ! got=$(check_response "$url" 401 -H "Authorization: Bearer $(tamper "$tok")"); then
            skip_reason="with a tampered signature: $got, expected 401 (is the signature checked?)"
            return 1
        fi
    fi
    if [[ $t == jwt-eddsa+ratelimit ]]; then
        hdrs=$(curl -s --noproxy '*' --max-time 2 -o /dev/null -D - -H "Authorization: Bearer $tok" "$url" |
            awk -F': ' 'tolower($1) == "ratelimit-policy" { sub(/\r$/, "", $2); print $2 }')
        if [[ -z $hdrs ]]; then
            skip_reason="no RateLimit-Policy in the response (are the rate limits on?)"
            return 1
        fi
        bench_log "$t: RateLimit-Policy: $(paste -sd, <<<"$hdrs")"
    fi
    if [[ $t == jwt-eddsa+identity && -n $identity_check ]]; then
        skip_reason=$identity_check
        return 1
    fi
}

run_duration=$BENCH_DURATION
run_warmup=$BENCH_WARMUP

# prepare_reuse TARGET: wrk sends the target's one token with every request.
prepare_reuse() {
    local t=$1 alg=${target_alg[$1]} tok
    tok=${token[${alg:-EdDSA}]}
    BENCH_WRK_SCRIPT=""
    BENCH_WRK_SCRIPT_ARGS=()
    BENCH_WRK_EXTRA_ARGS=(-H "Authorization: Bearer $tok")
    BENCH_DURATION=$run_duration
    BENCH_WARMUP=$run_warmup
    BENCH_POST_RUN=""
    BENCH_EXTRA_JSON="$base_extra,\"phase\":\"reuse\",\"path\":\"${route_path[$t]}/bench\",\"alg\":\"${alg:-none}\",\"token_bytes\":${#tok}"
}

# prepare_fresh TARGET: wrk sends a new token with every request (wrk/tokens.lua); checks
# first that the route takes a token of that batch. Sets skip_reason and returns 1 otherwise.
prepare_fresh() {
    local t=$1 alg=${target_alg[$1]} a got url=$base_url${route_path[$1]}/bench
    a=${alg:-EdDSA}
    if [[ -z ${fresh_file[$a]:-} ]]; then
        skip_reason=${fresh_error[$a]:-no fresh $a tokens}
        return 1
    fi
    if ! got=$(check_response "$url" "200 $BENCH_BODY_BYTES" -H "Authorization: Bearer ${fresh_check[$a]}"); then
        skip_reason="with a fresh token: '$got' (status and body size), expected '200 $BENCH_BODY_BYTES'"
        return 1
    fi
    BENCH_WRK_SCRIPT=$BENCH_LIB_DIR/wrk/tokens.lua
    BENCH_WRK_SCRIPT_ARGS=("${fresh_file[$a]}" "${route_path[$t]}/bench" "$BENCH_THREADS")
    BENCH_WRK_EXTRA_ARGS=()
    BENCH_DURATION=$BENCH_FRESH_DURATION
    BENCH_WARMUP=0s
    BENCH_POST_RUN=hook_fresh_tokens
    BENCH_EXTRA_JSON="$base_extra,\"phase\":\"fresh\",\"path\":\"${route_path[$t]}/bench\",\"alg\":\"${alg:-none}\",\"token_bytes\":${#fresh_check[$a]},\"tokens\":$BENCH_FRESH_TOKENS"
}

# After a fresh run: did it send more requests than there were tokens (then some repeated,
# and may have been answered from the node's memory of verified tokens)? Requests in flight
# when wrk stopped count too: up to one per connection. Said for `none` too in the JSON line,
# but no warning: there is no guard there to remember anything.
hook_fresh_tokens() {
    local sent=$((BENCH_WRK_REQUESTS + BENCH_CONNECTIONS)) repeated=false
    if ((sent > BENCH_FRESH_TOKENS)); then
        repeated=true
    fi
    if [[ $repeated == true && -n ${target_alg[$t]} ]]; then
        fresh_repeated[$t]=1
        bench_log "$t: WARNING: about $sent requests for $BENCH_FRESH_TOKENS tokens: tokens were sent again, so some requests skipped the signature check; raise BENCH_FRESH_TOKENS or shorten BENCH_FRESH_DURATION"
    fi
    BENCH_POST_RUN_JSON="\"tokens_repeated\":$repeated"
}

# --- measure -----------------------------------------------------------------------------
declare -A cpu_us=() p99_us=() rps=() checked=() fresh_repeated=()
declare -A phase_rows=()
for phase in "${phases[@]}"; do
    BENCH_ROWS=()
    bench_log "=== $phase phase"
    for t in "${targets[@]}"; do
        skip_reason=$skip_all
        # The checks of the route, once per run.
        if [[ -z $skip_reason && -z ${checked[$t]+x} ]]; then
            check_target "$t" || true
            checked[$t]=$skip_reason
        fi
        [[ -n $skip_reason ]] || skip_reason=${checked[$t]}
        if [[ -z $skip_reason ]] && "prepare_$phase" "$t"; then
            if bench_measure "$t" "$base_url${route_path[$t]}/bench" "$outpost_pid"; then
                cpu_us[$phase/$t]=$BENCH_RESULT_CPU_US
                p99_us[$phase/$t]=$BENCH_RESULT_P99_US
                rps[$phase/$t]=$BENCH_RESULT_RPS
            else
                skip_reason="the measured run failed"
            fi
            # bench_measure names wrk's raw output after the target: keep each phase's.
            for f in "$BENCH_TMP/wrk-$t.txt" "$BENCH_TMP/wrk-$t-warmup.txt"; do
                if [[ -e $f ]]; then mv "$f" "${f%.txt}-$phase.txt"; fi
            done
            if ! kill -0 "$outpost_pid" 2>/dev/null || bench_is_zombie "$outpost_pid"; then
                skip_all="outpost serve exited during the run of $t"
                bench_log_tail outpost
            fi
        fi
        if [[ -n $skip_reason ]]; then
            bench_log "$t ($phase): SKIPPED: $skip_reason"
            bench_add_skipped "$t" "$skip_reason"
        fi
    done
    phase_rows[$phase]=$(printf '%s\n' "${BENCH_ROWS[@]}")
done
BENCH_WRK_SCRIPT=""
BENCH_WRK_SCRIPT_ARGS=()
BENCH_WRK_EXTRA_ARGS=()
BENCH_POST_RUN=""

# --- report ------------------------------------------------------------------------------
w=10
for t in "${targets[@]}"; do ((${#t} <= w)) || w=${#t}; done
# vs_none PHASE: each target of the phase against its `none`.
vs_none() {
    local phase=$1 t base=${cpu_us[$1/none]:-}
    [[ -n $base ]] || return 0
    echo
    printf "%-${w}s %14s %18s %10s %12s\n" "vs none" "CPU-µs ratio" "guard CPU-µs/req" "p99 ratio" "req/s ratio"
    for t in "${targets[@]}"; do
        [[ $t != none && -n ${cpu_us[$phase/$t]:-} ]] || continue
        printf "%-${w}s %13s %17s %10s %12s\n" "$t" \
            "$(bench_ratio "${cpu_us[$phase/$t]}" "$base")" \
            "$(awk -v a="${cpu_us[$phase/$t]}" -v b="$base" 'BEGIN { if (a == "NaN" || b == "NaN") print "n/a"; else printf "%+.2f\n", a - b }')" \
            "$(bench_ratio "${p99_us[$phase/$t]}" "${p99_us[$phase/none]}")" \
            "$(bench_ratio "${rps[$phase/$t]}" "${rps[$phase/none]}")"
    done
    echo "(guard CPU-µs/req: the target's CPU-µs/req minus none's, what the guard adds per request)"
}

echo
echo "edge guards, ${BENCH_BODY_BYTES}-byte body, wrk -t${BENCH_THREADS} -c${BENCH_CONNECTIONS}" \
    "on core ${BENCH_CLIENT_CPU}, origin on core ${BENCH_ORIGIN_CPU}, outpost on core ${BENCH_SERVER_CPU}"
echo "one outpost process, one route per target, measured one after the other; every request carries a bearer JWT"
echo "CPU-µs/req: outpost's CPU (utime+stime) per request; CPU %: its busy time over the run (100 = one core);"
echo "other %: CPU used meanwhile by processes outside the benchmark (should be ~0)"
for phase in "${phases[@]}"; do
    echo
    if [[ $phase == reuse ]]; then
        echo "== reuse: one token per algorithm, sent with every request (the node remembers it once verified)," \
            "${run_duration} after ${run_warmup} of warm-up"
    else
        echo "== fresh: a token never sent before with every request (the full check every time)," \
            "${BENCH_FRESH_DURATION}, no warm-up, ${BENCH_FRESH_TOKENS} tokens per algorithm"
    fi
    mapfile -t BENCH_ROWS <<<"${phase_rows[$phase]}"
    bench_print_table
    vs_none "$phase"
    if [[ $phase == fresh ]] && ((${#fresh_repeated[@]})); then
        echo "WARNING: tokens ran out (and repeated) during the run of: ${!fresh_repeated[*]}"
    fi
done
if [[ " ${phases[*]} " == *" reuse "* && " ${phases[*]} " == *" fresh "* ]]; then
    echo
    echo "what a token new to the node costs more than a remembered one (fresh minus reuse CPU-µs/req;"
    echo "none's difference is what the per-request tokens cost without a guard):"
    for t in "${targets[@]}"; do
        [[ -n ${cpu_us[fresh/$t]:-} && -n ${cpu_us[reuse/$t]:-} ]] || continue
        printf "  %-${w}s %+8.2f\n" "$t" "$(awk -v a="${cpu_us[fresh/$t]}" -v b="${cpu_us[reuse/$t]}" 'BEGIN { print (a == "NaN" || b == "NaN") ? "nan" : a - b }')"
    done
fi
echo
echo "results: ${BENCH_RESULTS_FILE#"$BENCH_REPO_DIR"/}"
