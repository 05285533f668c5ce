# One image for every gateway process: the four workers, the modem simulator and the reference server.
# Pick the process with the command, e.g. `python -m sync_worker` (see compose.yaml and docs/operations.md).
# No secrets are baked in: settings are SMSGW_* environment variables read at start-up, secrets files mounted at
# run time (compose secrets: SMSGW_SECRET_FILE, SMSGW_AMQP_PASSWORD_FILE; docs/operations.md, "Secrets").
#
# No `# syntax=` line: that makes BuildKit fetch a frontend image from Docker Hub, which breaks offline and mirrored
# builds. Only plain Dockerfile instructions are used, so the classic builder builds it too.
#
# Build arguments (docs/operations.md, "Building the image"):
#   BASE_IMAGE      any Debian-like image with python3 >= 3.11 and its venv module (default: the official slim
#                   Python image). A mirror (registry.example.org/python:3.11-slim) or a local base works.
#   EXTRA_CA_CERTS  PEM text of extra CA certificates for the build's downloads from PyPI, for builds behind a
#                   proxy that re-signs HTTPS (EXTRA_CA_CERTS="$(cat corp-ca.pem)"). Used by the build stage only:
#                   it is not in the final image (the gateway's own CA for the Sync URL: REQUESTS_CA_BUNDLE).
ARG BASE_IMAGE=python:3.11-slim

# --- build: wheels of the project and its runtime dependencies (no dev extras) ---------------------------------
FROM ${BASE_IMAGE} AS build
ARG EXTRA_CA_CERTS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# A virtual environment: the same commands on the official image and on a Debian base whose system Python refuses
# `pip install` (PEP 668).
RUN python3 -m venv /opt/build-venv
WORKDIR /src
COPY pyproject.toml ./
COPY services ./services
COPY modem_worker ./modem_worker
COPY simulator ./simulator
COPY sync_worker ./sync_worker
COPY task_poller ./task_poller
COPY result_reporter ./result_reporter
COPY send_api ./send_api
COPY reference_server ./reference_server
RUN set -e; \
    if [ -n "$EXTRA_CA_CERTS" ]; then \
        cat /etc/ssl/certs/ca-certificates.crt > /tmp/ca-bundle.pem; \
        printf '%s\n' "$EXTRA_CA_CERTS" >> /tmp/ca-bundle.pem; \
        export PIP_CERT=/tmp/ca-bundle.pem; \
    fi; \
    /opt/build-venv/bin/pip wheel --wheel-dir /wheels .

# --- runtime -----------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/smsgw/bin:$PATH \
    SMSGW_STATE_DIR=/var/lib/smsgw \
    SMSGW_METRICS_PORT=9100 \
    SMSGW_METRICS_ADDR=0.0.0.0
COPY --from=build /wheels /tmp/wheels
# The gateway's own venv first on PATH: `python` and `smsgw` are the venv's on every base.
RUN python3 -m venv /opt/smsgw \
    && /opt/smsgw/bin/pip install --no-index --find-links /tmp/wheels smssync-gateway \
    && rm -rf /tmp/wheels
# Non-root. "dialout" (gid 20 on Debian/Ubuntu hosts) owns /dev/ttyUSB*; compose adds the host's gid when it
# differs (group_add). The state dir is created here so a fresh named volume inherits the ownership.
RUN groupadd --system --gid 10001 smsgw \
    && useradd --system --uid 10001 --gid smsgw --groups dialout --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin smsgw \
    && install -d -o smsgw -g smsgw -m 0750 /var/lib/smsgw
USER smsgw
WORKDIR /var/lib/smsgw
EXPOSE 9100
# Default: print how to run each process. Compose always sets a command.
CMD ["sh", "-c", "echo 'smssync-gateway: run one of: python -m modem_worker | sync_worker | task_poller | result_reporter (each takes --check), smsgw parked|config|check|compose-modems (smsgw --help), python -m simulator, python -m reference_server'; echo; for m in modem_worker sync_worker task_poller result_reporter; do python -m $m --help; echo; done"]
