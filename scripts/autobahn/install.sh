#!/usr/bin/env bash
# Install Autobahn|Testsuite (wstest, Python 2.7 only) into a dedicated
# virtualenv and print the absolute path of the wstest executable on stdout
# (and nothing else on stdout; progress goes to stderr).
#
#   AUTOBAHN_VENV   virtualenv location (default: $HOME/.cache/ringcast/autobahn-venv)
#   AUTOBAHN_PYTHON explicit python2.7 interpreter to use (optional)
#
# Idempotent: if the venv exists and was built from the current
# requirements.txt (sha256 stamp) and wstest imports, it exits in well under
# a second without touching the network.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
req="$here/requirements.txt"
venv="${AUTOBAHN_VENV:-$HOME/.cache/ringcast/autobahn-venv}"
stamp="$venv/.ringcast-autobahn-stamp"
virtualenv_pin="virtualenv==16.7.12" # last single-file virtualenv; runs on py2.7, bundles pip 20.3.4/setuptools 44

log() { echo "autobahn/install: $*" >&2; }

want_stamp="$(sha256sum "$req" | cut -d' ' -f1)"

# Python 2 tools (pip 20.x, cryptography 3.3) print loud deprecation banners.
export PYTHONWARNINGS="ignore::DeprecationWarning,ignore:Python 2 is no longer supported"
export PIP_DISABLE_PIP_VERSION_CHECK=1

healthy() {
    [ -x "$venv/bin/wstest" ] && [ -f "$stamp" ] &&
        [ "$(cat "$stamp")" = "$want_stamp" ] &&
        "$venv/bin/python" -c 'import autobahntestsuite, autobahn, twisted, wsaccel' >/dev/null 2>&1
}

if healthy; then
    echo "$venv/bin/wstest"
    exit 0
fi

find_python2() {
    local c root
    if [ -n "${AUTOBAHN_PYTHON:-}" ]; then
        echo "$AUTOBAHN_PYTHON"
        return 0
    fi
    root=""
    if command -v pyenv >/dev/null 2>&1; then
        root="$(pyenv root 2>/dev/null || true)"
    fi
    for c in \
        ${root:+"$root"/versions/2.7.18/bin/python} \
        ${PYENV_ROOT:+"$PYENV_ROOT"/versions/2.7.18/bin/python} \
        "$HOME"/.pyenv/versions/2.7.18/bin/python \
        /root/.pyenv/versions/2.7.18/bin/python \
        $(ls -d ${root:+"$root"/versions/2.7.*/bin/python} "$HOME"/.pyenv/versions/2.7.*/bin/python \
            /root/.pyenv/versions/2.7.*/bin/python 2>/dev/null | sort -rV) \
        "$(command -v python2.7 2>/dev/null || true)" \
        "$(command -v python2 2>/dev/null || true)"; do
        if [ -n "$c" ] && [ -x "$c" ] &&
            "$c" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (2, 7) else 1)' 2>/dev/null; then
            echo "$c"
            return 0
        fi
    done
    return 1
}

py2="$(find_python2 || true)"
if [ -z "$py2" ]; then
    # Last resort. Note: Debian 12 (bookworm) no longer ships python2.7, so
    # this only helps on older releases.
    if command -v apt-get >/dev/null 2>&1; then
        log "no Python 2.7 found via pyenv; trying apt-get install python2.7"
        sudo_=""
        [ "$(id -u)" = 0 ] || sudo_="sudo"
        $sudo_ apt-get update -qq >&2 || true
        if $sudo_ apt-get install -y -qq python2.7 >&2; then
            py2="$(command -v python2.7 || true)"
        fi
    fi
fi
if [ -z "$py2" ]; then
    log "ERROR: no Python 2.7 interpreter found (looked in \$(pyenv root)/versions/2.7.*, ~/.pyenv, PATH)."
    log "       set AUTOBAHN_PYTHON=/path/to/python2.7"
    exit 1
fi
log "using $py2 ($("$py2" -c 'import sys; print(sys.version.split()[0])'))"

start=$(date +%s)

# (Re)create the venv if it is missing or broken.
if ! "$venv/bin/python" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (2, 7) else 1)' >/dev/null 2>&1 ||
    ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    log "creating virtualenv at $venv"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    boot="$(mktemp -d "${TMPDIR:-/tmp}/autobahn-virtualenv.XXXXXX")"
    trap 'rm -rf "$boot"' EXIT
    # pyenv's 2.7.18 ships pip 19.2.3 but no virtualenv; install the
    # single-file virtualenv into a throwaway dir (doesn't touch pyenv's
    # site-packages).
    "$py2" -m pip install -q --disable-pip-version-check --no-warn-script-location \
        --target "$boot" "$virtualenv_pin" >&2
    PYTHONPATH="$boot" "$py2" -m virtualenv -q -p "$py2" "$venv" >&2
    rm -rf "$boot"
    trap - EXIT
fi

log "installing pinned autobahntestsuite requirements"
"$venv/bin/python" -m pip install -q --no-warn-script-location -r "$req" >&2
"$venv/bin/python" -m pip check >&2

# Smoke test: wstest must import all of its machinery and report its version.
if ! "$venv/bin/wstest" --autobahnversion >&2; then
    log "ERROR: wstest does not run"
    exit 1
fi

echo "$want_stamp" >"$stamp"
log "done in $(($(date +%s) - start))s"
echo "$venv/bin/wstest"
