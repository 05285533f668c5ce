# CI stand-in for the rabbitmq:4.2-management image of compose.yaml (scripts/compose-check): Debian's RabbitMQ
# (3.10, which the tests' broker runs too), because only Debian's, PyPI's and npm's registries can be reached there.
# Same interface as the official image for what compose.yaml uses: docker-entrypoint.sh with RABBITMQ_DEFAULT_USER /
# RABBITMQ_DEFAULT_PASS (first boot), /etc/rabbitmq/conf.d, enabled_plugins, data in /var/lib/rabbitmq, logs on
# stdout, rabbitmq-diagnostics for the healthcheck.
ARG BASE_IMAGE=smsgw-ci/base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends rabbitmq-server \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o rabbitmq -g rabbitmq /etc/rabbitmq/conf.d /var/lib/rabbitmq \
    && rm -f /var/lib/rabbitmq/.erlang.cookie
COPY rabbitmq-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV HOME=/var/lib/rabbitmq RABBITMQ_LOGS=-
USER rabbitmq
EXPOSE 5672 15672 15692
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["rabbitmq-server"]
