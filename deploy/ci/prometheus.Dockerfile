# CI stand-in for the prom/prometheus image of compose.yaml (scripts/compose-check): Debian's Prometheus, because
# Docker Hub cannot be reached there. Same entry point and paths as the official image for what compose.yaml uses.
ARG BASE_IMAGE=smsgw-ci/base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o nobody -g nogroup /prometheus
USER nobody
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
