# Sourced by the launch scripts. run_job CMD...: runs the job as a child of this shell, so that
# a SIGTERM, SIGINT or SIGHUP sent to the script reaches it, and the script then exits with 128 +
# the signal (143, 130, 129) whatever the job's own status: a stopped job is never reported as
# done. (horovodrun itself exits 1 after a signal, since the workers hold their exit until it
# kills them: distbn/ending.py says why.)
# The job runs in a process group of its own (job control, `set -m`), so that it gets each
# signal once, from the trap: a terminal's Ctrl-C signals the whole foreground group, and
# horovodrun 0.28.1 can hang on a second signal: its handler sets a threading.Event, whose
# lock a handler interrupted by the next signal already holds (seen under `make train` with
# the machine loaded: all of horovodrun's threads waiting on that one lock, its workers gone).
# stdin is /dev/null: a background group that read the terminal would be stopped.
run_job() {
  local pid status caught=0
  set -m
  "$@" </dev/null &
  pid=$!
  set +m
  trap 'caught=15; kill -TERM "$pid" 2>/dev/null || true' TERM
  trap 'caught=2; kill -INT "$pid" 2>/dev/null || true' INT
  trap 'caught=1; kill -TERM "$pid" 2>/dev/null || true' HUP
  while :; do
    status=0
    wait "$pid" || status=$?
    # wait also returns when a trapped signal arrives; the job may still be running then
    kill -0 "$pid" 2>/dev/null || break
  done
  trap - TERM INT HUP
  [ "$caught" -eq 0 ] || return $((128 + caught))
  return "$status"
}
