#!/usr/bin/env bash
# Installs the two third-party SMSsync peers used by the integration tests (shared/protocol-notes.md section 3):
#   .peers/seedphp/index.php  - the PHP sample web service from the seed docs (run with php-cli's built-in server)
#   .peers/lykmapipo/         - npm smssync@0.3.28 + express@4 with the host app tests/peers/lykmapipo/server.js
# Idempotent: re-running only redoes what is missing or out of date. Needs root for apt-get when php is missing.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The repo is cloned next to a shared/ folder; resolve it relative to the repo root, never by absolute path.
root=$(git -C "$script_dir" rev-parse --show-toplevel)
docs="$root/../shared/seed/smssync-docs.txt"
peers="$root/.peers"

log() { printf 'peers/install: %s\n' "$*" >&2; }

apt_install() {
    # Refresh the package lists only when apt does not know a candidate yet (fresh machine).
    local policy
    policy=$(apt-cache policy "$@" 2>/dev/null || true)
    if ! grep -q 'Candidate: [0-9]' <<<"$policy"; then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- preconditions, before installing anything ------------------------------------------------------------
# The seed PHP sample comes from the seed docs in a shared/ folder next to the repo. A plain clone has none:
# outside CI its tests are skipped with this reason (tests/peers/runners.py); in CI it is a failure.
seed=1
if [[ ! -r "$docs" ]]; then
    if [[ -n "${CI:-}" ]]; then
        log "seed docs not found at $docs (expected a shared/ folder next to the repo)"
        exit 1
    fi
    log "seed docs not found at $docs: the seed PHP peer's tests will be skipped"
    seed=0
fi

# --- tools ------------------------------------------------------------------------------------------------
if [[ $seed == 1 ]] && ! command -v php >/dev/null 2>&1; then
    apt_install php-cli
fi
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
fi

# --- seed PHP sample (protocol-notes 3.1) -----------------------------------------------------------------
install_seedphp() {
mkdir -p "$peers/seedphp"
start=$(grep -n '^/\*\*$' "$docs" | head -1 | cut -d: -f1)
end=$(grep -n "^Assuming you've the above code" "$docs" | head -1 | cut -d: -f1)
if [[ -z "$start" || -z "$end" || "$start" -ge "$end" ]]; then
    log "could not find the PHP sample in $docs"
    exit 1
fi
tmp_php=$(mktemp "$peers/seedphp/.index.php.XXXXXX")
trap 'rm -f "$tmp_php"' EXIT
{ echo '<?php'; sed -n "${start},$((end - 1))p" "$docs"; } >"$tmp_php"
php -l "$tmp_php" >/dev/null
chmod 644 "$tmp_php"
if cmp -s "$tmp_php" "$peers/seedphp/index.php"; then
    rm -f "$tmp_php"
else
    mv "$tmp_php" "$peers/seedphp/index.php"
    log "wrote .peers/seedphp/index.php"
fi
trap - EXIT
}
if [[ $seed == 1 ]]; then
    install_seedphp
fi

# --- npm smssync (lykmapipo) peer (protocol-notes 3.2) ----------------------------------------------------
lyk="$peers/lykmapipo"
mkdir -p "$lyk"
cp "$script_dir/lykmapipo/server.js" "$lyk/server.js"
# npm rewrites package.json; keep the template's copy as the stamp that decides whether to reinstall.
if ! cmp -s "$script_dir/lykmapipo/package.json" "$lyk/.template-package.json" \
    || [[ ! -f "$lyk/node_modules/smssync/package.json" || ! -d "$lyk/node_modules/express" ]]; then
    cp "$script_dir/lykmapipo/package.json" "$lyk/package.json"
    # The lock file pins every transitive version: smssync's own ranges are open-ended (>=).
    cp "$script_dir/lykmapipo/package-lock.json" "$lyk/package-lock.json"
    log "npm ci in .peers/lykmapipo"
    (cd "$lyk" && npm ci --no-audit --no-fund --loglevel=error)
    cp "$script_dir/lykmapipo/package.json" "$lyk/.template-package.json"
fi
node -e 'const v=require(process.argv[1]).version; if (v !== "0.3.28") { console.error("smssync " + v); process.exit(1); }' \
    "$lyk/node_modules/smssync/package.json"

log "ok: $( [[ $seed == 1 ]] && echo "php $(php -r 'echo PHP_VERSION;'), ")node $(node --version)"
