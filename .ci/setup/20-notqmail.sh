# qmail-qmqpc, the canonical QMQP client (mini-qmail, ezmlm-idx), built from the vendored
# notqmail source beside the repository (../shared/vendor/, see its README) into
# $TOOLS/notqmail. Its qmail home (conf-qmail, compiled into the program) is
# $TOOLS/notqmail/qmail: qmail-qmqpc reads control/qmqpservers there, which tests/qmail.rs
# writes under a lock. Only qmail-qmqpc and what it links are built (make qmail-qmqpc).
# Sourced by .ci/run with ROOT and TOOLS set; exports QMQPD_QMAIL_QMQPC.

notqmail_tarball=$ROOT/../shared/vendor/notqmail-a7012e4.tar.gz
notqmail_dir=$TOOLS/notqmail
notqmail_stamp=$notqmail_dir/built-from

if [[ ! -x $notqmail_dir/bin/qmail-qmqpc ]] ||
    [[ $(cat "$notqmail_stamp" 2>/dev/null) != "${notqmail_tarball##*/}" ]]; then
    if [[ ! -f $notqmail_tarball ]]; then
        echo ".ci/setup/20-notqmail.sh: $notqmail_tarball is missing" >&2
        exit 1
    fi
    rm -rf "$notqmail_dir"
    mkdir -p "$notqmail_dir/src" "$notqmail_dir/bin" "$notqmail_dir/qmail/control"
    tar -xzf "$notqmail_tarball" -C "$notqmail_dir/src" --strip-components=1
    echo "$notqmail_dir/qmail" >"$notqmail_dir/src/conf-qmail"
    make -C "$notqmail_dir/src" -s qmail-qmqpc >"$notqmail_dir/build.log" 2>&1 || {
        tail -n 30 "$notqmail_dir/build.log" >&2
        exit 1
    }
    install -m 0755 "$notqmail_dir/src/qmail-qmqpc" "$notqmail_dir/bin/qmail-qmqpc"
    rm -rf "$notqmail_dir/src"
    echo "${notqmail_tarball##*/}" >"$notqmail_stamp"
fi

export QMQPD_QMAIL_QMQPC=$notqmail_dir/bin/qmail-qmqpc
