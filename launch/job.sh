# Sourced by the launch scripts. run_job CMD...: runs the job as a child of this shell, so that
# a SIGTERM, SIGINT or SIGHUP sent to the script reaches it, and the script then exits with 128 +
# the signal (143, 130, 129) whatever the job's own status: a stopped job is never reported as
# done. (horovodrun itself exits 1 after a signal, since the workers hold their exit until it
# kills them: distbn/ending.py says why.)
run_job() {
  local pid status caught=0
  "$@" &
  pid=$!
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
