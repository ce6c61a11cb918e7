#!/usr/bin/env python3
"""Sorts the samples of `perf script` output (from `perf record -g`) into buckets that say
where a server's CPU time goes: process start (exec, dynamic loader, page faults), inode
allocation, fsync, logging, name look-ups, and so on.

usage: perf script -i perf.data | benches/perf-buckets.py [COMM...]

Only samples of the given commands count (default: qmqpd and its threads). A sample goes to
the first bucket, in the order below, that one of its stack frames matches, so the more
specific causes come first. Kernel stacks are complete; user-space stacks of a release build
stop early unless it was built with -C force-frame-pointers=yes, so user-space causes
(logging, for one) are undercounted and land in "user code and the rest".
"""

import re
import sys
from collections import Counter

# (bucket, regular expression over one frame's symbol), first match wins.
BUCKETS = [
    ("exec: kernel side (execve, ELF load)", r"^(__x64_sys_execve|load_elf_binary|begin_new_exec)$"),
    ("exit: tear down (exit_mmap, exit_group)", r"^(do_exit|do_group_exit|exit_mmap|mmput)$"),
    ("dynamic loader (ld.so relocations, symbol look-up)", r"^(_dl_start|dl_main|_dl_relocate_object|_dl_lookup_symbol_x|do_lookup_x|_dl_map_object.*|_dl_init)$"),
    ("glibc start-up (cpu features, tunables)", r"^(init_cpu_features.*|update_active.*|__libc_start_main.*|__tunables_init|__GI___tunables_init|handle_amd|handle_intel|get_common_indices.*|__cpu_indicator_init|__libc_early_init)$"),
    ("Rust runtime start-up (/proc/self/maps via pthread_getattr_np)", r"^(pthread_getattr_np.*|std::rt::init.*|std::sys::.*stack_overflow.*|show_map|show_map_vma|show_vma_header_prefix)$"),
    ("create queue file: inode allocation (ext4_create)", r"^(ext4_create|__ext4_new_inode)$"),
    ("fsync/fdatasync of file and directory", r"^(__x64_sys_fsync|__x64_sys_fdatasync|ext4_sync_file)$"),
    ("rename into new/", r"^__x64_sys_rename(at2?)?$"),
    ("thread create/exit (clone3, stack mmap, munmap)", r"^(__x64_sys_clone3|__x64_sys_clone|__x64_sys_exit|__x64_sys_munmap|__x64_sys_madvise|start_thread|create_thread)$"),
    ("client name look-up (getnameinfo/getaddrinfo, NSS files)", r"^(getnameinfo|getaddrinfo|gethostbyaddr_r.*|__nss_.*|_nss_files_.*|__res_.*)$"),
    ("socket I/O (read request, write reply)", r"^(sock_read_iter|sock_write_iter|tcp_sendmsg|tcp_recvmsg|__x64_sys_shutdown|__x64_sys_poll|sock_close|__x64_sys_getpeername)$"),
    ("logging (format, sanitize, write to log)", r"(logging|log::|<qmqpd::logging::Backend as log::Log>::log)"),
    ("queue file write (write(2) to the queue file)", r"^(ext4_buffered_write_iter|ext4_file_write_iter)$"),
    ("other page faults", r"^(exc_page_fault|asm_exc_page_fault|handle_mm_fault)$"),
    ("other mmap/mprotect", r"^(__x64_sys_mmap|__x64_sys_mprotect|__x64_sys_brk)$"),
    ("other system calls", r"^__x64_sys_"),
]
COMPILED = [(name, re.compile(rx)) for name, rx in BUCKETS]


def frames_symbol(line):
    """The symbol of one stack line of `perf script` ("addr sym+off (dso)")."""
    parts = line.strip().split(None, 1)
    if len(parts) < 2:
        return ""
    sym = parts[1].rsplit(" (", 1)[0]
    return re.sub(r"\+0x[0-9a-f]+$", "", sym)


def main():
    comms = set(sys.argv[1:]) or {"qmqpd", "connection", "peername", "signals"}
    counts = Counter()
    total = 0
    sample, stack = None, []

    def flush():
        nonlocal total
        if sample is None or sample not in comms:
            return
        total += 1
        for name, rx in COMPILED:
            if any(rx.search(f) for f in stack):
                counts[name] += 1
                return
        counts["user code and the rest"] += 1

    for line in sys.stdin:
        if not line.strip():
            flush()
            sample, stack = None, []
        elif not line[0].isspace():
            sample = line.split()[0]
        else:
            stack.append(frames_symbol(line))
    flush()
    if total == 0:
        print("no samples for", ", ".join(sorted(comms)))
        return
    print(f"{total} samples of {', '.join(sorted(comms))}")
    for name, n in counts.most_common():
        print(f"{100 * n / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
