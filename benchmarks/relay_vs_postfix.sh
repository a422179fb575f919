#!/usr/bin/env bash
# relay_vs_postfix.sh — mailrelay against Postfix, side by side, under Postfix's own load tools.
#
# Where it sits: outside the message's journey, timing it.
#   smtp-source ──SMTP──▶ relay (a private Postfix, or mailrelay) ──SMTP──▶ smtp-sink -c
# In: nothing but the machine (installs Debian's postfix if missing; needs root).  Out: for each load,
# accept and end-to-end messages/s, medians of 3 runs, the ratio mailrelay/Postfix, and the ceiling
# (smtp-source straight into smtp-sink).  Everything is on 127.0.0.1, on ports the OS picked free; every
# process it starts is stopped on exit; nothing is written to /etc/postfix and no system Postfix is
# configured or left running.  Exit status: 0; 1 when mailrelay could not be measured; 2 bad usage.
#
#   benchmarks/relay_vs_postfix.sh            # the full run, 3 runs per relay and load (~5-15 min)
#   benchmarks/relay_vs_postfix.sh --quick    # 1 run each, fewer messages (~1-3 min)
#
# Options: --runs N, --timeout SECONDS (per run), --loads 1,3 (only these loads, numbered as below),
# --no-mailrelay, --keep (keep the work directory and its logs), --memory (also run benchmarks/memory.py),
# --no-steps (skip the per-step latency of one session, benchmarks/steps.py, printed after the table),
# --peers (also Exim and OpenSMTPD as relays, interleaved with the others, each one's durability shown
# by an strace of one message: benchmarks/peers.sh).  Environment: MAILRELAY_VENV (a virtualenv with
# bin/twistd), BENCH_TMPDIR (where the work directory goes; default /var/tmp, which is a disk and not
# tmpfs on Debian: queues must really fsync for "durable" to mean anything), BENCH_PEERS_DEBS (a
# directory for the peers' .deb files, kept between runs; default: fetched into the work directory).
set -euo pipefail

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }

RUNS=3
TIMEOUT=120
QUICK=0
KEEP=0
WITH_MAILRELAY=1
WITH_MEMORY=0
ONLY_LOADS=""
WITH_STEPS=1
WITH_PEERS=0
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1; RUNS=1 ;;
        --runs) RUNS="$2"; shift ;;
        --timeout) TIMEOUT="$2"; shift ;;
        --loads) ONLY_LOADS=",$2,"; shift ;;
        --no-steps) WITH_STEPS=0 ;;
        --peers) WITH_PEERS=1 ;;
        --keep) KEEP=1 ;;
        --no-mailrelay) WITH_MAILRELAY=0 ;;
        --memory) WITH_MEMORY=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "relay_vs_postfix.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
SMTP_SOURCE=/usr/sbin/smtp-source
SMTP_SINK=/usr/sbin/smtp-sink

say() { printf '%s\n' "$*"; }
die() { printf 'relay_vs_postfix.sh: %s\n' "$*" >&2; exit 1; }

# ---- the loads: label | smtp-source arguments | message count ---------------------------------------
if [ "$QUICK" = 1 ]; then SMALL_M=1000; LARGE_M=200; STEP_SESSIONS=200; else SMALL_M=5000; LARGE_M=1000; STEP_SESSIONS=1000; fi
LOADS=(
    "-s 20 -m $SMALL_M -l 2048|-s 20 -l 2048|$SMALL_M"
    "-s 1 -m $SMALL_M -l 2048|-s 1 -l 2048|$SMALL_M"
    "-s 50 -m $SMALL_M -l 2048|-s 50 -l 2048|$SMALL_M"
    "-s 20 -m $LARGE_M -l 102400|-s 20 -l 102400|$LARGE_M"
)
# Fixed envelope, so both relays route exactly the same way (smtp-source's default is foo@hostname).
SOURCE_ENVELOPE=(-4 -f bench@example.org -t sink@example.net)

# ---- the virtualenv: $MAILRELAY_VENV, ./.venv, /work/venv — the first with bin/twistd --------------
find_venv() {
    local candidate
    for candidate in "${MAILRELAY_VENV:-}" "$PWD/.venv" "$REPO/.venv" /work/venv; do
        if [ -n "$candidate" ] && [ -x "$candidate/bin/twistd" ]; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    return 1
}
VENV="$(find_venv || true)"
if [ -n "$VENV" ]; then PYTHON="$VENV/bin/python"; else PYTHON="$(command -v python3 || true)"; fi
[ -n "$PYTHON" ] || die "no Python found (set MAILRELAY_VENV to a virtualenv with mailrelay installed)"
harness() { "$PYTHON" "$HERE/harness.py" "$@"; }
# shellcheck source=benchmarks/peers.sh
[ "$WITH_PEERS" = 0 ] || . "$HERE/peers.sh"

# A long harness step runs as a background job and is waited for: `wait` returns as soon as a trapped
# signal arrives (a foreground command would delay the trap until it ended), and cleanup can stop it.
STEP_PID=
harness_step() {
    "$PYTHON" "$HERE/harness.py" "$@" &
    STEP_PID=$!
    local status=0
    wait "$STEP_PID" || status=$?
    STEP_PID=
    return "$status"
}

# ---- postfix: install if missing, never configured or run as the system's MTA ----------------------
install_postfix() {
    if [ -x /usr/sbin/postfix ] && [ -x "$SMTP_SOURCE" ] && [ -x "$SMTP_SINK" ]; then
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "postfix is not installed and installing it needs root"
    say "installing Debian's postfix (debconf: \"No configuration\"): smtp-source, smtp-sink, the relay"
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix >/dev/null
    # "No configuration" writes no /etc/postfix/main.cf, so the package's own start fails; if a service
    # manager started a system Postfix anyway, stop that one (it is the one we just installed).
    local system_pid
    system_pid="$(tr -dc 0-9 < /var/spool/postfix/pid/master.pid 2>/dev/null || true)"
    if [ -n "$system_pid" ] && kill -0 "$system_pid" 2>/dev/null; then
        say "stopping the system Postfix that the package started"
        if command -v systemctl >/dev/null && systemctl is-active --quiet postfix 2>/dev/null; then
            systemctl stop postfix
        else
            postfix stop >/dev/null 2>&1 || true
        fi
    fi
    [ -x "$SMTP_SOURCE" ] && [ -x "$SMTP_SINK" ] \
        || die "postfix installed but $SMTP_SOURCE or $SMTP_SINK is missing"
}

# Postfix's commands print their errors only to a terminal (else to its log): give them one.
postfix_cmd() {
    if command -v script >/dev/null; then
        script -qec "$(printf '%q ' postfix -c "$PF/etc" "$@")" /dev/null
    else
        postfix -c "$PF/etc" "$@"
    fi
}

# A private Postfix: its own config, queue and data directories under $PF; nothing in /etc/postfix is
# written (postfix-script reads the package's file lists there, no settings).  The minimum found to
# work with 3.7: root runs `postfix -c DIR start`; queue_directory exists (postfix creates its
# subdirectories); data_directory is owned by mail_owner; every directory above them is traversable by
# the postfix user; chroot is off (a chroot would need copies of /etc files inside the queue
# directory).  compatibility_level = 3.6 silences the backwards-compatibility warnings.
write_postfix_config() {
    mkdir -p "$PF/etc" "$PF/queue" "$PF/data"
    chown postfix "$PF/data"
    cat > "$PF/etc/main.cf" <<EOF
# Written by relay_vs_postfix.sh: a loopback-only relay to smtp-sink.
compatibility_level = 3.6
queue_directory = $PF/queue
data_directory = $PF/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix-bench.localhost
mydomain = localhost
# Nothing is local: every recipient is relayed (no local delivery, no aliases).
mydestination =
local_recipient_maps =
local_transport = error:5.1.1 local delivery is disabled
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:$SINK_PORT
# Logging to a file, as mailrelay does (there may be no syslog daemon on this machine).
maillog_file = $PF/maillog
maillog_file_prefixes = $PF
EOF
    # Only the services a relay uses; chroot (5th column) off everywhere.
    cat > "$PF/etc/master.cf" <<EOF
127.0.0.1:$PF_PORT inet n - n - - smtpd
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
showq     unix  n - n - - showq
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
EOF
}

postfix_master_pid() {
    tr -dc 0-9 < "$PF/queue/pid/master.pid" 2>/dev/null || true
}

start_postfix() {
    postfix_cmd start >"$PF/start.out" 2>&1 || { cat "$PF/start.out" >&2; return 1; }
    harness wait-port 127.0.0.1 "$PF_PORT" --timeout 30
}

stop_postfix() {
    [ -n "${PF:-}" ] && [ -d "$PF/queue/pid" ] || return 0
    local pid; pid="$(postfix_master_pid)"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    postfix_cmd stop >/dev/null 2>&1 || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    postfix_cmd abort >/dev/null 2>&1 || true
    sleep 1
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
}

# After a run that did not finish: an empty queue, so the next run counts only its own messages.
reset_postfix() {
    say "  (restarting Postfix with an empty queue)"
    stop_postfix
    postsuper -c "$PF/etc" -d ALL >/dev/null 2>&1 || true
    start_postfix
}

# ---- smtp-sink: the next hop of both relays and of the ceiling run ---------------------------------
start_sink() {
    local attempt
    for attempt in 1 2 3; do                      # a port picked free can be taken before we bind it
        SINK_PORT="$(harness port)"
        # -c: one "sess= quit= mesg=" record per event, the counter the harness reads.
        # -u nobody: smtp-sink refuses to keep root. 1024: the listen backlog.
        "$SMTP_SINK" -c -u nobody "127.0.0.1:$SINK_PORT" 1024 >"$WORK/sink.counter" 2>"$WORK/sink.err" &
        SINK_PID=$!
        harness wait-port 127.0.0.1 "$SINK_PORT" --timeout 10 --pid "$SINK_PID" && return 0
        kill "$SINK_PID" 2>/dev/null || true
    done
    cat "$WORK/sink.err" >&2
    return 1
}

# ---- mailrelay -------------------------------------------------------------------------------------
start_mailrelay() {
    [ -n "$VENV" ] || { MR_PROBLEM="no virtualenv with bin/twistd (set MAILRELAY_VENV)"; return 1; }
    rm -rf "$MR/spool"
    mkdir -p "$MR"
    harness mailrelay-conf --port "$MR_PORT" --sink-port "$SINK_PORT" --spool "$MR/spool" \
        > "$MR/tap.conf"
    # The working directory is the checkout, so the twistd plugin is found even when not installed.
    (cd "$REPO" && PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" \
        exec "$VENV/bin/twistd" -n --pidfile= mailrelay --config "$MR/tap.conf") >>"$MR/twistd.log" 2>&1 &
    MR_PID=$!
    if ! harness wait-port 127.0.0.1 "$MR_PORT" --timeout 30 --pid "$MR_PID"; then
        MR_PROBLEM="mailrelay did not start listening; $(mailrelay_log_tail)"
        stop_mailrelay
        return 1
    fi
}

mailrelay_log_tail() {
    printf 'last lines of %s:\n' "$MR/twistd.log"
    tail -n 15 "$MR/twistd.log" 2>/dev/null | sed 's/^/    /'
}

stop_mailrelay() {
    [ -n "${MR_PID:-}" ] || return 0
    if kill -0 "$MR_PID" 2>/dev/null; then
        kill -TERM "$MR_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$MR_PID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$MR_PID" 2>/dev/null && kill -KILL "$MR_PID" 2>/dev/null || true
    fi
    wait "$MR_PID" 2>/dev/null || true
    MR_PID=
}

reset_mailrelay() {
    say "  (restarting mailrelay with an empty spool)"
    stop_mailrelay
    start_mailrelay
}

# ---- cleanup: everything started here, by process id -----------------------------------------------
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [ -n "${STEP_PID:-}" ]; then
        kill -TERM "$STEP_PID" 2>/dev/null || true      # harness.py stops its smtp-source
        wait "$STEP_PID" 2>/dev/null || true
    fi
    stop_mailrelay
    [ "$WITH_PEERS" = 0 ] || peers_stop || true
    stop_postfix
    if [ -n "${SINK_PID:-}" ]; then
        kill "$SINK_PID" 2>/dev/null || true
        wait "$SINK_PID" 2>/dev/null || true
    fi
    if [ -n "${WORK:-}" ] && [ -d "$WORK" ]; then
        if [ "$KEEP" = 1 ]; then say "work directory kept: $WORK"; else rm -rf "$WORK"; fi
    fi
    exit "$status"
}

# ---- one measured run -------------------------------------------------------------------------------
# measure RELAY PORT LABEL RUN MESSAGES SOURCE_ARGS... ; status 3 when the run did not finish.
measure() {
    local relay="$1" port="$2" label="$3" run="$4" messages="$5"
    shift 5
    harness_step run --relay "$relay" --load "$label" --run "$run" --messages "$messages" \
        --counter "$WORK/sink.counter" --timeout "$TIMEOUT" --out "$RESULTS" \
        -- "$SMTP_SOURCE" "$@" -m "$messages" "${SOURCE_ENVELOPE[@]}" "127.0.0.1:$port"
}

record() {   # record RELAY LABEL RUN MESSAGES STATUS DETAIL
    harness record --relay "$1" --load "$2" --run "$3" --messages "$4" --status "$5" \
        --detail "$6" --out "$RESULTS"
}

mailrelay_alive() { [ -n "${MR_PID:-}" ] && kill -0 "$MR_PID" 2>/dev/null; }

run_mailrelay() {   # run_mailrelay LABEL RUN MESSAGES ARGS...
    local label="$1" run="$2" messages="$3"
    shift 3
    [ "$WITH_MAILRELAY" = 1 ] || return 0
    if [ -n "$MR_PROBLEM" ]; then
        record mailrelay "$label" "$run" "$messages" failed "not running"
        return 0
    fi
    if [ -n "${MR_SKIP[$label]:-}" ]; then
        record mailrelay "$label" "$run" "$messages" skipped "an earlier run of this load did not finish"
        return 0
    fi
    if ! measure mailrelay "$MR_PORT" "$label" "$run" "$messages" "$@"; then
        MR_SKIP[$label]=1
        if mailrelay_alive; then
            reset_mailrelay || true
        else
            MR_PROBLEM="mailrelay exited during a run; $(mailrelay_log_tail)"
        fi
    elif ! mailrelay_alive; then
        MR_PROBLEM="mailrelay exited after a run; $(mailrelay_log_tail)"
    fi
}

run_postfix() {   # run_postfix LABEL RUN MESSAGES ARGS...
    local label="$1" run="$2" messages="$3"
    shift 3
    if [ -n "${PF_SKIP[$label]:-}" ]; then
        record postfix "$label" "$run" "$messages" skipped "an earlier run of this load did not finish"
        return 0
    fi
    measure postfix "$PF_PORT" "$label" "$run" "$messages" "$@" || {
        PF_SKIP[$label]=1
        reset_postfix || die "the private Postfix did not restart (see $PF/maillog)"
    }
}

# ---- main -------------------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die "run as root: Postfix's master starts as root and switches to mail_owner"
install_postfix

WORK=
SINK_PID=
MR_PID=
MR_PROBLEM=
declare -A MR_SKIP=() PF_SKIP=()
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

BASE="${BENCH_TMPDIR:-/var/tmp}"
WORK="$(mktemp -d "$BASE/relaybench.XXXXXX")"
chmod 755 "$WORK"                      # the postfix user must reach its queue and data directories
PF="$WORK/postfix"
MR="$WORK/mailrelay"
RESULTS="$WORK/results.jsonl"
FSTYPE="$(stat -f -c %T "$WORK")"
if [ "$FSTYPE" = tmpfs ]; then
    say "WARNING: $WORK is on tmpfs: fsync costs nothing there, so durability is not measured"
fi

start_sink || die "smtp-sink did not start"
PF_PORT="$(harness port)"
write_postfix_config
start_postfix || die "the private Postfix did not start (see $PF/maillog; --keep keeps it)"
MR_PORT="$(harness port)"
if [ "$WITH_MAILRELAY" = 1 ]; then
    start_mailrelay || true
else
    MR_PROBLEM="not run (--no-mailrelay)"
fi

say "relay_vs_postfix: $(nproc) CPUs, Postfix $(postconf -d -h mail_version 2>/dev/null)," \
    "load average $(cut -d' ' -f1-3 /proc/loadavg), work directory $WORK ($FSTYPE)"
say "sink 127.0.0.1:$SINK_PORT  postfix 127.0.0.1:$PF_PORT  mailrelay 127.0.0.1:$MR_PORT ${VENV:+($VENV)}"
say "$RUNS run(s) per relay and load, at most ${TIMEOUT}s each"
[ -z "$MR_PROBLEM" ] || say "MAILRELAY NOT MEASURED: $MR_PROBLEM"

# Warm-up (not counted): every relay has started its processes and connections once.
warm_up() {   # warm_up PORT
    harness_step run --relay warmup --load warmup --run 0 --messages 100 --timeout 30 \
        --counter "$WORK/sink.counter" --out "$WORK/warmup.jsonl" \
        -- "$SMTP_SOURCE" -s 20 -m 100 -l 2048 "${SOURCE_ENVELOPE[@]}" "127.0.0.1:$1" >/dev/null
}
warm_up "$PF_PORT" || reset_postfix || die "the private Postfix did not restart (see $PF/maillog)"
if [ -z "$MR_PROBLEM" ]; then
    warm_up "$MR_PORT" || reset_mailrelay || true
fi
if [ "$WITH_PEERS" = 1 ]; then
    peers_prepare
    peers_start
    for name in "${PEER_NAMES[@]}"; do
        if [ -n "${PEER_PROBLEM[$name]:-}" ]; then
            say "$(tr a-z A-Z <<<"$name") NOT MEASURED: ${PEER_PROBLEM[$name]}"
        else
            say "$name ${PEER_VERSION[$name]:-} 127.0.0.1:${PEER_PORT[$name]}"
        fi
    done
    peers_probe_all
fi

load_number=0
for entry in "${LOADS[@]}"; do
    load_number=$((load_number + 1))
    if [ -n "$ONLY_LOADS" ] && [[ "$ONLY_LOADS" != *",$load_number,"* ]]; then continue; fi
    IFS='|' read -r label args messages <<<"$entry"
    read -r -a source_args <<<"$args"
    say ""
    say "load: smtp-source $label"
    for run in $(seq "$RUNS"); do
        measure ceiling "$SINK_PORT" "$label" "$run" "$messages" "${source_args[@]}" || true
    done
    # Alternating, so that a slow phase of the machine falls on both relays alike.
    for run in $(seq "$RUNS"); do
        run_postfix "$label" "$run" "$messages" "${source_args[@]}"
        run_mailrelay "$label" "$run" "$messages" "${source_args[@]}"
        [ "$WITH_PEERS" = 0 ] || run_peers "$label" "$run" "$messages" "${source_args[@]}"
    done
done

say ""
say "messages/s, median of $RUNS run(s): acc = accepted (smtp-source finished),"
say "  e2e = end to end (all at smtp-sink); ratio = mailrelay / Postfix;"
say "  ceiling = smtp-source straight into smtp-sink; runs = finished runs, postfix/mailrelay"
say ""
harness table "$RESULTS"
[ "$WITH_PEERS" = 0 ] || peers_report
# One session's time, step by step: what bounds -s 1 (both relays still up, the sink still counting).
if [ -z "$MR_PROBLEM" ] && [ "$WITH_STEPS" = 1 ]; then
    say ""
    step_relays=("postfix=127.0.0.1:$PF_PORT" "mailrelay=127.0.0.1:$MR_PORT")
    if [ "$WITH_PEERS" = 1 ]; then
        for name in "${PEER_NAMES[@]}"; do
            [ -n "${PEER_PROBLEM[$name]:-}" ] || step_relays+=("$name=127.0.0.1:${PEER_PORT[$name]}")
        done
    fi
    "$PYTHON" "$HERE/steps.py" "${step_relays[@]}" --sessions "$STEP_SESSIONS" || true
fi
MR_FAILED=0
if [ -n "$MR_PROBLEM" ] && [ "$WITH_MAILRELAY" = 1 ]; then
    say ""
    say "MAILRELAY: $MR_PROBLEM"
    [ "$KEEP" = 1 ] || say "(the work directory is removed on exit: --keep keeps the logs)"
    MR_FAILED=1
fi

if [ "$WITH_MEMORY" = 1 ] && [ -n "$VENV" ]; then
    say ""
    "$PYTHON" "$HERE/memory.py" || true      # it prints PASS/FAIL, or why it could not measure
fi

# Exit status: 1 when mailrelay was meant to be measured and could not be (Postfix's numbers are above).
exit "$MR_FAILED"
