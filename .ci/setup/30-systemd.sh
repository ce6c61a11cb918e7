# Sourced by .ci/run (TOOLS set, set -euo pipefail in force). tests/systemd.rs boots a
# systemd 252 as PID 1 with systemd-nspawn over a minimal Debian 12 tree and installs the
# package in it; lintian checks the package (packaging/ci-check). This script installs the
# host tools, makes the tree once (debootstrap, cached under $TOOLS/systemd/) and builds the
# package, so the test itself only boots, installs and checks.
#
#   QMQPD_SYSTEMD_ROOT   the cached tree; tests boot an overlay of it and never write into it
#
# The tree is rebuilt when RECIPE changes (a stamp file records the recipe it was made from).

systemd_setup() {
    local root=$TOOLS/systemd/bookworm
    local stamp=$TOOLS/systemd/bookworm.recipe
    # debootstrap's minbase plus systemd (dbus is not needed: systemctl talks to PID 1 over
    # its private socket). qmqpc, qmqpd and qmqp-queue come from the package under test.
    local recipe="bookworm minbase systemd 1"
    local mirror=http://deb.debian.org/debian
    local missing=() pkg repo
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

    for pkg in debootstrap systemd-container lintian; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]} > 0)); then
        apt-get install -y -q -o Dpkg::Use-Pty=0 --no-install-recommends "${missing[@]}"
    fi

    if [[ ! -x $root/usr/lib/systemd/systemd || $(cat "$stamp" 2>/dev/null) != "$recipe" ]]; then
        echo "30-systemd: debootstrap bookworm into $root" >&2
        rm -rf "$root.new" "$stamp"
        mkdir -p "$TOOLS/systemd"
        debootstrap --variant=minbase --include=systemd bookworm "$root.new" "$mirror" >&2
        # Every boot gets its own machine id (nspawn passes one); nothing here may need a
        # terminal, a D-Bus or the network, so the units that would wait for them are masked.
        : >"$root.new/etc/machine-id"
        rm -f "$root.new/var/lib/dbus/machine-id"
        local unit
        for unit in systemd-logind.service console-getty.service getty@.service \
            apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
            systemd-networkd-wait-online.service; do
            ln -sfn /dev/null "$root.new/etc/systemd/system/$unit"
        done
        printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' \
            >"$root.new/etc/hosts"
        rm -f "$root.new"/var/cache/apt/archives/*.deb
        rm -rf "$root"
        mv "$root.new" "$root"
        echo "$recipe" >"$stamp"
    fi
    export QMQPD_SYSTEMD_ROOT=$root

    # The package the test installs (cargo-deb reuses the release build afterwards).
    "$repo/packaging/build-deb" >/dev/null
}
systemd_setup
