# Sourced by scripts/test: makes sure the Debian tools that the ops tests run are
# installed (promtool and prometheus from `prometheus`, `docker-compose`, and as root
# `iproute2`). Installs
# them quietly with apt-get when absent (CI starts on a fresh machine). Debian's
# prometheus package would start a service on port 9090: a policy-rc.d that
# refuses service starts is put in place for the install (and removed if we made it).

ensure_debian_tools() {
    local missing=()
    command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
    command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
    command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
    # ip and tc for the scalability benchmark's test (tests/scale), which needs root.
    [ "$(id -u)" -ne 0 ] || command -v tc >/dev/null 2>&1 || missing+=(iproute2)
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing ${missing[*]}: install them (apt-get install ${missing[*]})" >&2
        return 1
    fi
    echo "installing ${missing[*]} with apt-get" >&2
    local policy=/usr/sbin/policy-rc.d made_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod 755 "$policy"
        made_policy=1
    fi
    local status=0
    apt-get update -qq >/dev/null 2>&1 || status=$?
    if [ "$status" -eq 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null 2>&1 || status=$?
    fi
    if [ -n "$made_policy" ]; then
        rm -f "$policy"
    fi
    if [ "$status" -ne 0 ]; then
        echo "apt-get install ${missing[*]} failed (exit $status)" >&2
        return 1
    fi
    # Belt and braces: never leave a packaged prometheus service holding port 9090.
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
    return 0
}
