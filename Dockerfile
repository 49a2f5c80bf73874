# One image for every batchdb process: the worker, the dashboard, the Dagster code server and the
# migrations. The command picks the role (deploy/docker-entrypoint.sh):
#
#   docker run IMAGE                 # worker (the default CMD)
#   docker run IMAGE worker -c 32    # worker with options (`batchdb worker --help`)
#   docker run IMAGE migrate         # batchdb db upgrade, then exit
#   docker run IMAGE dashboard       # Streamlit on 0.0.0.0:8501
#   docker run IMAGE code-server     # dagster api grpc on 0.0.0.0:3030 (the example code location)
#   docker run IMAGE batchdb status  # anything else runs as given (the Dagster Helm chart passes
#                                    # `dagster api grpc ...` this way)
#
# Stopping: SIGTERM to PID 1 (the entry point execs, so that is batchdb itself). A worker stops
# claiming, hands back rows whose call was not sent, gives sent calls up to 30 s, gives the batch
# driver's current step up to 30 s more and waits up to 5 s for an unreachable database: allow it
# 90 s before SIGKILL (`docker stop -t 90`, terminationGracePeriodSeconds: 90, TimeoutStopSec=90).
# tests/test_deploy.py runs this file's pip install and entry point in a fresh virtualenv.

FROM python:3.11-slim AS build
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/batchdb/bin:$PATH
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/batchdb batchdb
COPY --from=build /wheels /wheels
COPY constraints.txt /wheels/constraints.txt
RUN python -m venv /opt/batchdb
# The core plus the extras a deployment runs: [dagster] for the code server, [dashboard] for the
# dashboard; every version pinned by constraints.txt, as CI installs them.
RUN /opt/batchdb/bin/pip install --no-cache-dir --constraint /wheels/constraints.txt "$(echo /wheels/batchdb-*.whl)[dagster,dashboard]" && rm -rf /wheels
COPY deploy/docker-entrypoint.sh /usr/local/bin/batchdb-entrypoint
USER 10001:10001
WORKDIR /home/batchdb
# 9464: the worker's /metrics and /healthz (BATCHDB_METRICS_PORT); 8501: the dashboard; 3030: Dagster gRPC.
ENV BATCHDB_METRICS_PORT=9464
EXPOSE 9464 8501 3030
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/batchdb-entrypoint"]
CMD ["worker"]
