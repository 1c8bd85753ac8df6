# Shared by the bench scripts (sourced, not run): start-up waits and shutdown of the servers they launch.
# Everything here is loopback and bounded in time.

# wait_port PID PORT NAME: up to 5 s for 127.0.0.1:PORT to accept while PID lives; fails (with a message)
# when PID exited first or the port never accepted.
wait_port() {
    for _ in $(seq 1 50); do
        kill -0 "$1" 2>/dev/null || { echo "!! $3 exited at start" >&2; return 1; }
        (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "!! $3 is not listening on 127.0.0.1:$2 after 5 s" >&2
    return 1
}

# stop PID: SIGTERM, then SIGKILL if it is still up 10 s later. SIGTERM, not SIGINT: a background job of a
# non-interactive shell starts with SIGINT ignored, so only a server that installs its own handler
# (ringcast does) would stop on it.
stop() {
    kill -TERM "$1" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# stop_all: stops every pid (all signalled at once, then each waited for) in the caller's `pids` array (each script appends the servers it starts).
stop_all() {
    local pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do stop "$pid"; done
    pids=()
}
