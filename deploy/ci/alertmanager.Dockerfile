# CI stand-in for the prom/alertmanager image of compose.yaml (scripts/compose-check): Debian's Alertmanager, because
# Docker Hub cannot be reached there. deploy/alertmanager/entrypoint.sh runs /bin/alertmanager and amtool, as in the
# official image.
ARG BASE_IMAGE=smsgw-ci/base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus-alertmanager \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/bin/prometheus-alertmanager /bin/alertmanager \
    && install -d -o nobody -g nogroup /alertmanager
USER nobody
EXPOSE 9093
