# dnsmasq: the real name server that tests/native_names.rs runs on loopback inside a network
# namespace, to check qmqpd's own resolver (DNS over UDP and TCP, /etc/hosts, the order of
# nsswitch.conf) without glibc's NSS. Only the binary (dnsmasq-base): no service is started.
if ! command -v dnsmasq >/dev/null && [[ ! -x /usr/sbin/dnsmasq ]]; then
    apt-get install -y -q -o Dpkg::Use-Pty=0 --no-install-recommends dnsmasq-base ||
        { apt-get update -q && apt-get install -y -q -o Dpkg::Use-Pty=0 --no-install-recommends dnsmasq-base; }
fi
