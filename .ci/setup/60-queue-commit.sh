# bindfs (a FUSE file system without O_TMPFILE) and fuse3 for tests/faults.rs: a queue there
# must fall back from the linkat commit to tmp/ + rename, and queue_commit_method = linkat
# must fail clearly (sourced by .ci/run as root, with `set -euo pipefail` and $TOOLS set).
# Debian's packages, installed when missing. Cost: about 10 s the first time (apt), nothing
# on a rerun.

queue_commit_missing=()
command -v bindfs >/dev/null || queue_commit_missing+=(bindfs)
command -v fusermount3 >/dev/null || queue_commit_missing+=(fuse3)

if ((${#queue_commit_missing[@]} > 0)); then
    flock /tmp/qmqpd-apt.lock apt-get update -q
    DEBIAN_FRONTEND=noninteractive flock /tmp/qmqpd-apt.lock \
        apt-get install -y -q -o Dpkg::Use-Pty=0 --no-install-recommends "${queue_commit_missing[@]}"
fi

bindfs --version | head -n 1 >&2
unset queue_commit_missing
