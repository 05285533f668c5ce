#!/bin/sh
# Entry point of the CI RabbitMQ stand-in (deploy/ci/rabbitmq.Dockerfile), like the official image's: the default
# user from RABBITMQ_DEFAULT_USER / RABBITMQ_DEFAULT_PASS (created by the server on an empty data directory only),
# then the server binary itself: Debian's /usr/sbin/rabbitmq-server wrapper ignores SIGTERM, so `docker stop` would
# wait for SIGKILL.
set -eu
[ "${1:-}" = rabbitmq-server ] && shift
if [ -n "${RABBITMQ_DEFAULT_USER:-}" ]; then
    umask 077
    {
        echo "default_user = ${RABBITMQ_DEFAULT_USER}"
        echo "default_pass = ${RABBITMQ_DEFAULT_PASS:-}"
    } > /etc/rabbitmq/conf.d/05-default-user.conf
fi
exec /usr/lib/rabbitmq/bin/rabbitmq-server "$@"
