# HAProxy and iproute2 for tests/proxy.rs and tests/cluster.rs (sourced by .ci/run as root,
# with `set -euo pipefail` and $TOOLS set). Debian's packages, installed when missing; the
# tests start their own HAProxy processes on their own configurations, so the packaged
# service must not run: its start is refused while installing, and it is stopped and
# disabled should it run anyway. Cost: about 15 s the first time (apt), nothing on a rerun.

haproxy_missing=()
command -v haproxy >/dev/null || [[ -x /usr/sbin/haproxy ]] || haproxy_missing+=(haproxy)
command -v ip >/dev/null || [[ -x /usr/sbin/ip || -x /sbin/ip ]] || haproxy_missing+=(iproute2)

if ((${#haproxy_missing[@]} > 0)); then
    # No service may start during the installation (policy-rc.d answers 101 "not allowed"),
    # unless the machine already has its own policy.
    haproxy_policy=
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        haproxy_policy=/usr/sbin/policy-rc.d
    fi
    flock /tmp/qmqpd-apt.lock apt-get update -q
    DEBIAN_FRONTEND=noninteractive flock /tmp/qmqpd-apt.lock \
        apt-get install -y -q -o Dpkg::Use-Pty=0 --no-install-recommends "${haproxy_missing[@]}"
    if [[ -n $haproxy_policy ]]; then
        rm -f "$haproxy_policy"
    fi
    unset haproxy_policy
fi

# Should the packaged service run (installed earlier without a policy), stop and disable it.
if [[ -x /etc/init.d/haproxy ]] && [[ -e /run/haproxy.pid ]]; then
    invoke-rc.d haproxy stop >/dev/null 2>&1 || /etc/init.d/haproxy stop >/dev/null 2>&1 || true
fi
if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
    systemctl disable --now haproxy.service >/dev/null 2>&1 || true
elif command -v update-rc.d >/dev/null && [[ -e /etc/init.d/haproxy ]]; then
    update-rc.d haproxy disable >/dev/null 2>&1 || true
fi

haproxy -v | head -n 1 >&2
unset haproxy_missing
