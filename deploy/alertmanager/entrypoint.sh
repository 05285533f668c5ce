#!/bin/sh
# Entry point of the alertmanager service (compose.yaml): render the configuration template from the ALERT_*
# settings, check it, then run Alertmanager with it. Alertmanager does not expand environment variables in its
# configuration, hence this step. Usage (what compose runs):
#   sh /etc/alertmanager/entrypoint.sh [alertmanager flags...]
# Also usable to render only (the tests do): ALERTMANAGER_RENDER_ONLY=1 sh entrypoint.sh > rendered.yml
#
# The template (deploy/alertmanager/alertmanager.yml): a line `<indent>#@NAME[,NAME...] <text>` becomes
# `<indent><text>` when every NAME is set and non-empty, and is dropped otherwise; ${NAME} anywhere is replaced
# by the value as a YAML double-quoted string. POSIX sh and awk only: the prom/alertmanager image is busybox.
set -eu

template=${ALERTMANAGER_TEMPLATE:-/etc/alertmanager/alertmanager.yml}
# On the data volume: writable by the image's user (nobody), unlike /etc/alertmanager (read-only mount).
rendered=${ALERTMANAGER_RENDERED:-/alertmanager/alertmanager.rendered.yml}

fail() {
    echo "alertmanager entrypoint: $*" >&2
    exit 2
}

# A URL with a token in it is a secret: ALERT_WEBHOOK_URL_FILE / ALERTMANAGER_WATCHDOG_URL_FILE name a file holding
# it (a compose secret), read here and written only into the rendered configuration, never into the environment
# of the container.
from_file() {
    name=$1
    eval "file=\${${name}_FILE:-}"
    [ -n "$file" ] || return 0
    eval "value=\${${name}:-}"
    [ -z "$value" ] || fail "set ${name} or ${name}_FILE, not both"
    [ -r "$file" ] || fail "${name}_FILE: cannot read $file (is the compose secret mounted?)"
    value=$(cat "$file")
    eval "${name}=\$value"
    export "${name?}"
}
from_file ALERT_WEBHOOK_URL
from_file ALERTMANAGER_WATCHDOG_URL

# Warning mail goes where critical mail goes unless told otherwise.
ALERT_EMAIL_WARNING_TO=${ALERT_EMAIL_WARNING_TO:-${ALERT_EMAIL_TO:-}}
export ALERT_EMAIL_WARNING_TO

if [ -n "${ALERT_EMAIL_WARNING_TO}" ]; then
    [ -n "${ALERT_SMTP_SMARTHOST:-}" ] || fail "ALERT_EMAIL_TO is set but ALERT_SMTP_SMARTHOST (host:port) is empty: no email can be sent"
    [ -n "${ALERT_SMTP_FROM:-}" ] || fail "ALERT_EMAIL_TO is set but ALERT_SMTP_FROM is empty: no email can be sent"
fi
if [ -n "${ALERT_SMTP_PASSWORD:-}" ] && [ -n "${ALERT_SMTP_PASSWORD_FILE:-}" ]; then
    fail "set ALERT_SMTP_PASSWORD or ALERT_SMTP_PASSWORD_FILE, not both"
fi
if [ -n "${ALERT_SMTP_PASSWORD_FILE:-}" ] && [ ! -r "${ALERT_SMTP_PASSWORD_FILE}" ]; then
    fail "ALERT_SMTP_PASSWORD_FILE: cannot read ${ALERT_SMTP_PASSWORD_FILE} (is the compose secret mounted?)"
fi
[ -r "$template" ] || fail "cannot read the template $template"

render() {
    awk '
    function quoted(value,    out, i, c) {
        out = ""
        for (i = 1; i <= length(value); i++) {
            c = substr(value, i, 1)
            if (c == "\\" || c == "\"") out = out "\\"
            out = out c
        }
        return "\"" out "\""
    }
    function enabled(names,    list, n, i) {
        n = split(names, list, ",")
        for (i = 1; i <= n; i++) if (ENVIRON[list[i]] == "") return 0
        return 1
    }
    {
        line = $0
        if (match(line, /^[ ]*#@[A-Z0-9_,]+ /)) {
            indent = substr(line, 1, index(line, "#@") - 1)
            rest = substr(line, RSTART + RLENGTH)
            names = substr(line, length(indent) + 3, RLENGTH - length(indent) - 3)
            if (!enabled(names)) next
            line = indent rest
        }
        out = ""
        while (match(line, /\$\{[A-Z0-9_]+\}/)) {
            out = out substr(line, 1, RSTART - 1) quoted(ENVIRON[substr(line, RSTART + 2, RLENGTH - 3)])
            line = substr(line, RSTART + RLENGTH)
        }
        print out line
    }' "$template"
}

if [ -n "${ALERTMANAGER_RENDER_ONLY:-}" ]; then
    render
    exit 0
fi

render > "$rendered"
amtool check-config "$rendered" >/dev/null || fail "the rendered configuration $rendered is invalid (see above)"
exec /bin/alertmanager --config.file="$rendered" "$@"
