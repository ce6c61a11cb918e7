#!/usr/bin/env python3
"""Picks the committed corpus of one fuzz target: the seed files, then, one at a time, the
fuzzer input that adds the most coverage edges not yet covered, up to CAP files.

Usage (from fuzz/, after `RUSTC_BOOTSTRAP=1 cargo fuzz build -O`):

    T=config
    mkdir -p /tmp/merge-$T
    target/x86_64-unknown-linux-gnu/release/$T -merge=1 -use_counters=0 \
        -merge_control_file=/tmp/control-$T /tmp/merge-$T SEED_DIR corpus-full/$T
    python3 select-corpus.py /tmp/control-$T SEED_DIR corpus/$T 100

SEED_DIR holds the hand-written seeds (keep a copy outside corpus/: OUT_DIR is emptied).
Files are named by the SHA-1 of their content, as libFuzzer names them.
"""

import hashlib
import os
import shutil
import sys


def read_control(path):
    """The input paths and, for each index, its coverage edges, from a merge control file."""
    lines = open(path).read().split("\n")
    count = int(lines[0])
    paths = lines[2 : 2 + count]
    edges = {}
    for line in lines[2 + count :]:
        fields = line.split()
        if fields and fields[0] == "COV":
            edges[int(fields[1])] = {int(x) for x in fields[2:]}
    return paths, edges


def main():
    control, seed_dir, out_dir, cap = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    paths, edges = read_control(control)
    seed_dir = os.path.abspath(seed_dir)
    chosen = [i for i, p in enumerate(paths) if os.path.abspath(p).startswith(seed_dir + "/")]
    covered = set().union(*(edges.get(i, set()) for i in chosen))
    reachable = set().union(*edges.values())
    while len(chosen) < cap:
        gains = [(len(e - covered), -os.path.getsize(paths[i]), i)
                 for i, e in edges.items() if i not in chosen]
        if not gains:
            break
        gain, _, best = max(gains)
        if gain == 0:
            break
        chosen.append(best)
        covered |= edges[best]
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    for i in chosen:
        data = open(paths[i], "rb").read()
        with open(os.path.join(out_dir, hashlib.sha1(data).hexdigest()), "wb") as f:
            f.write(data)
    print(f"{out_dir}: {len(chosen)} files, {len(covered)} of {len(reachable)} edges")


if __name__ == "__main__":
    main()
