# peers.sh — Exim and OpenSMTPD as relays beside Postfix and mailrelay; sourced by relay_vs_postfix.sh
# when it is given --peers (it uses that script's WORK, SINK_PORT, PYTHON, HERE, harness, measure,
# record, harness_step, say and SMTP_SOURCE).
#
# Where it sits: outside the message's journey, timing it.
#   smtp-source ──SMTP──▶ Exim or OpenSMTPD ──SMTP──▶ smtp-sink -c
# Debian's exim4 and opensmtpd packages conflict with postfix (all provide mail-transport-agent), so
# they are never installed: `apt-get download` fetches the .debs (or $BENCH_PEERS_DEBS holds them),
# `dpkg-deb -x` unpacks them into the work directory, with any shared library ldd reports missing
# (fetched the same way), and each relay runs from there with a private configuration and queue.
#
# Each relay runs in its own mount namespace (unshare -m) whose /etc/resolv.conf names only 127.0.0.1
# (nothing answers there) and reads /etc/hosts first, whose /etc/hosts has the names they need, and
# whose /etc/passwd and /etc/group add the users their binaries are built for, mapped onto existing
# ones or onto free system ids: nothing in /etc is changed and no user is created on the machine.
# OpenSMTPD's queue (/var/spool/smtpd), control socket (/run) and chroot (/var/lib/opensmtpd/empty)
# are compiled in: private directories are mounted over /var/spool, /run and /var/lib in its namespace.

PEER_NAMES=(exim opensmtpd)
declare -A PEER_PROBLEM=() PEER_PID=() PEER_PORT=() PEER_SKIP=() PEER_VERSION=() PEER_DURABILITY=() PEER_UID=()
PEERS_DIR=
PEERS_ROOT=
PEERS_LIBS=

peers_py() { "$PYTHON" "$HERE/peers.py" "$@"; }

peer_binary() {   # the unpacked binary of a peer
    case "$1" in
        exim) printf '%s\n' "$PEERS_ROOT/usr/sbin/exim4" ;;
        opensmtpd) printf '%s\n' "$PEERS_ROOT/usr/sbin/smtpd" ;;
    esac
}

peer_packages() {
    case "$1" in
        exim) printf '%s\n' exim4-daemon-light exim4-base exim4-config ;;
        opensmtpd) printf '%s\n' opensmtpd ;;
    esac
}

# A .deb in the package directory, fetched with apt-get download if it is not there yet.
fetch_deb() {   # fetch_deb DIR PACKAGE ; prints the file
    local dir="$1" pkg="$2" file
    file="$(ls "$dir/${pkg}"_*.deb 2>/dev/null | head -n 1 || true)"
    if [ -z "$file" ]; then
        (cd "$dir" && apt-get download -q "$pkg") >"$PEERS_DIR/download.log" 2>&1 || {
            printf 'apt-get download %s failed: %s\n' "$pkg" \
                "$(grep -E '^E:' "$PEERS_DIR/download.log" | head -n 1)" >&2
            return 1
        }
        file="$(ls "$dir/${pkg}"_*.deb 2>/dev/null | head -n 1 || true)"
    fi
    [ -n "$file" ] && printf '%s\n' "$file"
}

# Debian's name for the package of a shared library: libidn.so.12 -> libidn12, libfoo2.so.0 -> libfoo2-0.
library_package() {
    local soname="$1" base version
    base="${soname%%.so*}"
    version="${soname##*.so.}"
    version="${version%%.*}"
    case "$base" in
        *[0-9]) printf '%s-%s\n' "$base" "$version" ;;
        *) printf '%s%s\n' "$base" "$version" ;;
    esac
}

missing_libraries() {   # missing_libraries BINARY
    LD_LIBRARY_PATH="$PEERS_LIBS" ldd "$1" 2>/dev/null | awk '/not found/ {print $1}'
}

# Unpack every peer's packages and the libraries they lack; a peer that cannot be unpacked gets its
# PEER_PROBLEM and is not run.
peers_unpack() {
    PEERS_DIR="$WORK/peers"
    PEERS_ROOT="$PEERS_DIR/root"
    PEERS_LIBS="$PEERS_ROOT/usr/lib/x86_64-linux-gnu:$PEERS_ROOT/lib/x86_64-linux-gnu"
    local debs="${BENCH_PEERS_DEBS:-$PEERS_DIR/debs}" name pkg file binary lib err
    mkdir -p "$debs" "$PEERS_ROOT"
    for name in "${PEER_NAMES[@]}"; do
        for pkg in $(peer_packages "$name"); do
            err="$PEERS_DIR/fetch.err"
            if ! file="$(fetch_deb "$debs" "$pkg" 2>"$err")"; then
                PEER_PROBLEM[$name]="$(cat "$err")"
                break
            fi
            if ! dpkg-deb -x "$file" "$PEERS_ROOT" 2>"$err"; then
                PEER_PROBLEM[$name]="dpkg-deb -x $(basename "$file") failed: $(head -n 1 "$err")"
                break
            fi
            if [ "$pkg" = "$(peer_packages "$name" | head -n 1)" ]; then
                PEER_VERSION[$name]="$(dpkg-deb -f "$file" Version)"
            fi
        done
        [ -z "${PEER_PROBLEM[$name]:-}" ] || continue
        binary="$(peer_binary "$name")"
        [ -x "$binary" ] || { PEER_PROBLEM[$name]="$binary is not in its package"; continue; }
        for lib in $(missing_libraries "$binary"); do
            pkg="$(library_package "$lib")"
            if file="$(fetch_deb "$debs" "$pkg" 2>"$err")" && dpkg-deb -x "$file" "$PEERS_ROOT"; then
                say "  $name: $lib is not installed on this machine: unpacked from $(basename "$file")"
            fi
        done
        lib="$(missing_libraries "$binary" | tr '\n' ' ')"
        [ -z "$lib" ] || PEER_PROBLEM[$name]="ldd $binary: not found: $lib(no package for it could be unpacked)"
    done
}

# The namespace's entry: the private /etc files and directories mounted, then the relay exec'd (so
# the relay keeps the pid that was started).
write_ns_entry() {
    cat > "$PEERS_DIR/ns.sh" <<'EOF'
#!/bin/sh
# ns.sh ETC "SRC=DST ..." COMMAND... — run inside `unshare -m --propagation private`.
set -e
etc="$1"; mounts="$2"; shift 2
for f in resolv.conf hosts passwd group; do mount --bind "$etc/$f" "/etc/$f"; done
for m in $mounts; do mount --bind "${m%%=*}" "${m#*=}"; done
exec "$@"
EOF
    chmod 755 "$PEERS_DIR/ns.sh"
}

free_system_id() {   # a uid and gid below 1000 that neither /etc/passwd nor /etc/group uses
    local id
    for id in $(seq 999 -1 100); do
        getent passwd "$id" >/dev/null || getent group "$id" >/dev/null || { printf '%s\n' "$id"; return; }
    done
}

write_peer_etc() {   # write_peer_etc NAME "PASSWD-LINE" ...
    local etc="$PEERS_DIR/$1/etc" line
    shift
    mkdir -p "$etc"
    cat > "$etc/resolv.conf" <<'EOF'
# Loopback only: nothing answers on 127.0.0.1:53, and /etc/hosts is read first ("lookup" is
# OpenSMTPD's resolver's keyword; glibc ignores it and reads /etc/hosts first by nsswitch.conf).
nameserver 127.0.0.1
lookup file bind
options attempts:1 timeout:1
EOF
    printf '127.0.0.1\tlocalhost %s exim-bench.localhost\n::1\tlocalhost\n' "$(hostname)" > "$etc/hosts"
    cp /etc/passwd "$etc/passwd"
    cp /etc/group "$etc/group"
    for line in "$@"; do
        printf '%s\n' "$line" >> "$etc/passwd"
        printf '%s:x:%s:\n' "${line%%:*}" "$(cut -d: -f4 <<<"$line")" >> "$etc/group"
    done
}

peers_prepare() {
    mkdir -p "$WORK/peers"
    PEERS_DIR="$WORK/peers"
    command -v unshare >/dev/null || {
        for name in "${PEER_NAMES[@]}"; do PEER_PROBLEM[$name]="unshare(1) is missing (util-linux)"; done
        return 0
    }
    say "peers: unpacking Exim and OpenSMTPD (apt-get download, dpkg-deb -x; never installed)"
    peers_unpack
    write_ns_entry
    local mail_id exim_id os_id oq_id
    # Exim's binary is built for the user Debian-exim: here that name is the existing user mail.
    mail_id="$(id -u mail 2>/dev/null || true)"
    if [ -z "$mail_id" ]; then
        exim_id="$(free_system_id)"
        write_peer_etc exim "Debian-exim:x:$exim_id:$exim_id:Exim:/nonexistent:/usr/sbin/nologin"
    else
        exim_id="$mail_id"
        write_peer_etc exim "Debian-exim:x:$mail_id:$(id -g mail):Exim (= mail):/nonexistent:/usr/sbin/nologin"
    fi
    PEER_UID[exim]="$exim_id"
    # OpenSMTPD's privilege separation wants its two users (Debian's build: opensmtpd, opensmtpq).
    os_id="$(free_system_id)"
    oq_id="$(for id in $(seq $((os_id - 1)) -1 100); do
        getent passwd "$id" >/dev/null || getent group "$id" >/dev/null || { echo "$id"; break; }; done)"
    write_peer_etc opensmtpd \
        "opensmtpd:x:$os_id:$os_id:OpenSMTPD:/var/lib/opensmtpd/empty:/usr/sbin/nologin" \
        "opensmtpq:x:$oq_id:$oq_id:OpenSMTPD queue:/var/lib/opensmtpd/empty:/usr/sbin/nologin"
}

start_peer() {   # start_peer NAME ; sets PEER_PID, or PEER_PROBLEM and status 1
    local name="$1" dir="$PEERS_DIR/$1" port binary
    [ -z "${PEER_PROBLEM[$name]:-}" ] || return 1
    port="${PEER_PORT[$name]:-$(harness port)}"
    PEER_PORT[$name]="$port"
    binary="$(peer_binary "$name")"
    case "$name" in
        exim)
            rm -rf "$dir/spool" "$dir/log"
            mkdir -p "$dir/spool" "$dir/log"
            chown "${PEER_UID[exim]}" "$dir/spool" "$dir/log"
            peers_py exim-conf --port "$port" --sink-port "$SINK_PORT" --dir "$dir" --exim "$binary" \
                > "$dir/exim.conf"
            # -bdf: the listening daemon in the foreground; -q1m: a queue run a minute for retries.
            unshare -m --propagation private "$PEERS_DIR/ns.sh" "$dir/etc" "" \
                env LD_LIBRARY_PATH="$PEERS_LIBS" "$binary" -C "$dir/exim.conf" -bdf -q1m \
                >>"$dir/daemon.log" 2>&1 &
            ;;
        opensmtpd)
            rm -rf "$dir/spool" "$dir/run"
            mkdir -p "$dir/spool" "$dir/run" "$dir/varlib/opensmtpd/empty"
            peers_py opensmtpd-conf --port "$port" --sink-port "$SINK_PORT" > "$dir/smtpd.conf"
            # -d: in the foreground, logging to stderr.
            unshare -m --propagation private "$PEERS_DIR/ns.sh" "$dir/etc" \
                "$dir/spool=/var/spool $dir/run=/run $dir/varlib=/var/lib" \
                env LD_LIBRARY_PATH="$PEERS_LIBS" "$binary" -d -f "$dir/smtpd.conf" \
                >>"$dir/daemon.log" 2>&1 &
            ;;
    esac
    PEER_PID[$name]=$!
    if ! harness wait-port 127.0.0.1 "$port" --timeout 30 --pid "${PEER_PID[$name]}"; then
        PEER_PROBLEM[$name]="$name did not start listening; $(peer_log_tail "$name")"
        stop_peer "$name"
        return 1
    fi
}

peer_log_tail() {
    local log="$PEERS_DIR/$1/daemon.log"
    [ "$1" != exim ] || log="$PEERS_DIR/exim/log/mainlog"
    printf 'last lines of %s:\n' "$log"
    { tail -n 8 "$PEERS_DIR/$1/daemon.log"; [ "$1" != exim ] || tail -n 8 "$log"; } 2>/dev/null \
        | sed 's/^/    /'
    [ "$1" != exim ] || tail -n 8 "$PEERS_DIR/exim/log/paniclog" 2>/dev/null | sed 's/^/    panic: /'
}

descendants() {   # descendants PID: every process below PID, by parent pid
    local all queue=("$1") pid child
    all="$(ps -e -o pid=,ppid=)"
    while [ ${#queue[@]} -gt 0 ]; do
        pid="${queue[0]}"
        queue=("${queue[@]:1}")
        for child in $(awk -v p="$pid" '$2 == p {print $1}' <<<"$all"); do
            printf '%s\n' "$child"
            queue+=("$child")
        done
    done
}

# Safe under `set -e` (it runs from the exit trap too): no command here may fail the function.
stop_peer() {
    local name="$1" pid="${PEER_PID[$1]:-}" below left="" p
    [ -n "$pid" ] || return 0
    below="$(descendants "$pid" | tr '\n' ' ' || true)"
    # Exim's receiving and delivering processes outlive the daemon: they carry our config's path.
    if [ "$name" = exim ]; then
        below="$below $( (grep -lsF -- "$PEERS_DIR/exim/exim.conf" /proc/[0-9]*/cmdline || true) \
            | cut -d/ -f3 | tr '\n' ' ')"
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for _ in $(seq 30); do
        left=""
        for p in $below; do
            if [ "$p" != "$pid" ] && kill -0 "$p" 2>/dev/null; then left="$left $p"; fi
        done
        [ -n "$left" ] || break
        sleep 0.1
    done
    for p in $left; do kill -KILL "$p" 2>/dev/null || true; done
    PEER_PID[$name]=
    return 0
}

peers_stop() {
    local name
    for name in "${PEER_NAMES[@]}"; do stop_peer "$name" || true; done
}

peer_alive() { [ -n "${PEER_PID[$1]:-}" ] && kill -0 "${PEER_PID[$1]}" 2>/dev/null; }

peers_start() {
    local name
    for name in "${PEER_NAMES[@]}"; do
        if start_peer "$name"; then
            warm_up "${PEER_PORT[$name]}" || reset_peer "$name" || true
        fi
    done
}

reset_peer() {
    say "  (restarting $1 with an empty queue)"
    stop_peer "$1"
    start_peer "$1"
}

run_peer() {   # run_peer NAME LABEL RUN MESSAGES ARGS...
    local name="$1" label="$2" run="$3" messages="$4"
    shift 4
    if [ -n "${PEER_PROBLEM[$name]:-}" ]; then
        record "$name" "$label" "$run" "$messages" failed "not running"
        return 0
    fi
    if [ -n "${PEER_SKIP[$name|$label]:-}" ]; then
        record "$name" "$label" "$run" "$messages" skipped "an earlier run of this load did not finish"
        return 0
    fi
    local overflows status=0
    overflows="$(listen_overflows)"
    measure "$name" "${PEER_PORT[$name]}" "$label" "$run" "$messages" "$@" || status=$?
    overflows=$(( $(listen_overflows) - overflows ))
    # A full accept queue drops the client's SYN, which it sends again a second later (RFC 6298 §2).
    [ "$overflows" -le 0 ] \
        || say "            (a listen queue on this machine overflowed $overflows times during the run)"
    if [ "$status" != 0 ]; then
        PEER_SKIP[$name|$label]=1
        if peer_alive "$name"; then
            reset_peer "$name" || true
        else
            PEER_PROBLEM[$name]="$name exited during a run; $(peer_log_tail "$name")"
        fi
    elif ! peer_alive "$name"; then
        PEER_PROBLEM[$name]="$name exited after a run; $(peer_log_tail "$name")"
    fi
}

listen_overflows() {   # TcpExt ListenOverflows: SYNs dropped because an accept queue was full
    awk '$1 == "TcpExt:" { if (!n) { for (i = 2; i <= NF; i++) if ($i == "ListenOverflows") n = i; next }
                          print $n; exit }' /proc/net/netstat 2>/dev/null || echo 0
}

run_peers() {   # run_peers LABEL RUN MESSAGES ARGS...
    local name
    for name in "${PEER_NAMES[@]}"; do run_peer "$name" "$@"; done
}

# ---- durability: an strace of one message through a relay -----------------------------------------
# Every thread of the relay's processes is traced (-f follows the ones it forks): the sync calls, and
# the writes that carry its replies.  peers.py strace-summary says whether a sync came before the 250.
probe_durability() {   # probe_durability NAME PORT PID
    local name="$1" port="$2" pid="$3" out="$WORK/strace.$1" p tids=() strace_pid
    if ! command -v strace >/dev/null; then
        PEER_DURABILITY[$name]="not observed (strace is not installed)"
        return 0
    fi
    for p in "$pid" $(descendants "$pid"); do
        for t in /proc/"$p"/task/*; do if [ -d "$t" ]; then tids+=(-p "${t##*/}"); fi; done
    done
    strace -f -tt -y -s 120 -o "$out" \
        -e trace=fsync,fdatasync,sync_file_range,syncfs,msync,sync,write,writev,sendto,sendmsg \
        "${tids[@]}" 2>"$out.err" &
    strace_pid=$!
    # strace says "Process N attached" for each on stderr: wait until it has said so for all.
    for _ in $(seq 100); do
        [ "$(grep -c attached "$out.err" 2>/dev/null || true)" -ge $(( ${#tids[@]} / 2 )) ] && break
        sleep 0.05
    done
    harness_step run --relay "probe-$name" --load probe --run 0 --messages 1 --timeout 30 \
        --counter "$WORK/sink.counter" --out "$WORK/probe.jsonl" \
        -- "$SMTP_SOURCE" -s 1 -l 2048 -m 1 "${SOURCE_ENVELOPE[@]}" "127.0.0.1:$port" >/dev/null || true
    sleep 0.3
    kill -INT "$strace_pid" 2>/dev/null || true
    wait "$strace_pid" 2>/dev/null || true
    peers_py strace-summary "$out" > "$out.summary" 2>&1 || true
    PEER_DURABILITY[$name]="$(head -n 1 "$out.summary")"
    say "$name: $(cat "$out.summary")"
}

peers_probe_all() {   # the durability of every relay, as one message shows it
    say ""
    say "durability: strace -f -e trace=fsync,fdatasync,...,write,sendto of one message through each relay"
    probe_durability postfix "$PF_PORT" "$(postfix_master_pid)"
    if [ -z "$MR_PROBLEM" ]; then probe_durability mailrelay "$MR_PORT" "$MR_PID"; fi
    local name
    for name in "${PEER_NAMES[@]}"; do
        if [ -n "${PEER_PROBLEM[$name]:-}" ]; then
            PEER_DURABILITY[$name]="not run"
        else
            probe_durability "$name" "${PEER_PORT[$name]}" "${PEER_PID[$name]}"
        fi
    done
}

# The durability column: what the trace showed.  What each relay's source or documentation says is
# printed under the table (peer_durability_note).
peer_durability_cell() {
    local observed="${PEER_DURABILITY[$1]:-not observed}"
    printf '%s\n' "${observed%% (*}"
}

peer_durability_note() {
    case "$1" in
        postfix) say "  postfix: cleanup(8) fsyncs the queue file before smtpd(8) answers 250 (as shipped)" ;;
        exim) say "  exim: the -D and -H spool files and the input directory are fsynced before the 250" \
            "(as shipped; Debian's build has no disable_fsync)" ;;
        opensmtpd) say "  opensmtpd: queue_fs.c writes a new message and its envelope and renames them into" \
            "the queue without fsync; only an envelope rewritten after a failed attempt is fsynced" ;;
    esac
}

peers_report() {
    local name args=()
    for name in postfix "${PEER_NAMES[@]}"; do args+=(--durability "$name=$(peer_durability_cell "$name")"); done
    say ""
    say "mailrelay against each relay, messages/s, median of $RUNS run(s); ratio = mailrelay / relay;"
    say "  runs = finished runs, relay/mailrelay"
    say ""
    peers_py table "$RESULTS" "${args[@]}"
    say ""
    say "durability (the column: what an strace of one message showed; here: what the source says):"
    say "  mailrelay: $(peer_durability_cell mailrelay): the spool fsyncs a new queue file before the 250"
    for name in postfix "${PEER_NAMES[@]}"; do peer_durability_note "$name"; done
    for name in "${PEER_NAMES[@]}"; do
        [ -z "${PEER_PROBLEM[$name]:-}" ] || say "$(tr a-z A-Z <<<"$name") NOT MEASURED: ${PEER_PROBLEM[$name]}"
    done
    say "peers: Exim ${PEER_VERSION[exim]:-(not unpacked)}, OpenSMTPD ${PEER_VERSION[opensmtpd]:-(not unpacked)}" \
        "(Debian packages, unpacked in $PEERS_DIR)"
}
