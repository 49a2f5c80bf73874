#!/bin/sh
# The image's entry point: the first argument names the role, the rest are that role's options.
# Every branch execs, so the process that receives SIGTERM (PID 1 in a container) is batchdb
# itself and drains as `batchdb worker` documents; no shell stays in between.
#
#   worker [OPTIONS]       batchdb worker (the default); BATCHDB_METRICS_PORT serves /metrics, /healthz
#   migrate                batchdb db upgrade (run once per release, before the workers)
#   dashboard [OPTIONS]    batchdb dashboard on 0.0.0.0 (port 8501 unless --port)
#   code-server [ARGS]     dagster api grpc on 0.0.0.0; ARGS default to port 3030 and the example
#                          code location (-p 3030 -m batchdb.dagster.example)
#   anything else          run as given: `batchdb status`, `dagster api grpc ...` (what the Dagster
#                          Helm chart passes as the container's args), `sh`
set -eu

role="${1:-worker}"
[ "$#" -gt 0 ] && shift

case "$role" in
    worker)
        exec batchdb worker "$@"
        ;;
    migrate)
        exec batchdb db upgrade "$@"
        ;;
    dashboard)
        exec batchdb dashboard --host 0.0.0.0 "$@"
        ;;
    code-server)
        [ "$#" -gt 0 ] || set -- -p 3030 -m batchdb.dagster.example
        exec dagster api grpc -h 0.0.0.0 "$@"
        ;;
    *)
        exec "$role" "$@"
        ;;
esac
