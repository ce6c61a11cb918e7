//! Where connections come from: stdin/stdout, `--listen` and systemd sockets (see bin/qmqpd.rs for now).
