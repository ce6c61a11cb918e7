# LazyFS (issue 16): the FUSE file system with its own page cache that tests/powerloss.rs
# puts under the queue to simulate power cuts (`lazyfs::clear-cache` drops every write not
# yet fsynced). Built from the vendored source beside the clone, because its CMake files
# would fetch toml11 and spdlog from the internet: the unpacked copy is edited to use
# Debian's packages of exactly those versions instead (the tarball stays untouched).
# Sourced by .ci/run with ROOT, TOOLS and `set -euo pipefail`; exports QMQPD_LAZYFS.
# First run: about 2 minutes of compiling on 2 cores; a rerun: nothing to do.
# The ext4-on-LazyFS runs (tests/powerloss/ext4.rs) also need losetup, mount and umount
# (`mount`) and mkfs.ext4 and e2fsck (`e2fsprogs`): Debian's "required" packages, named
# here for a base image that left them out.

lazyfs_packages=(cmake g++ make pkg-config libfuse3-dev fuse3 libtoml11-dev libspdlog-dev
    mount e2fsprogs)
lazyfs_tarball=$ROOT/../shared/vendor/lazyfs-a47a5ba.tar.gz
lazyfs_dir=$TOOLS/lazyfs
lazyfs_bin=$lazyfs_dir/lazyfs-a47a5ba/lazyfs/build/lazyfs

lazyfs_missing=()
for pkg in "${lazyfs_packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
        lazyfs_missing+=("$pkg")
    fi
done
if ((${#lazyfs_missing[@]} > 0)); then
    # The lock serialises apt with anything else on this machine that installs packages.
    flock /tmp/qmqpd-apt.lock apt-get update -q
    flock /tmp/qmqpd-apt.lock apt-get install -y -q -o Dpkg::Use-Pty=0 \
        --no-install-recommends "${lazyfs_missing[@]}"
fi

if [[ ! -e $lazyfs_dir/built || ! -x $lazyfs_bin ]]; then
    if [[ ! -r $lazyfs_tarball ]]; then
        echo ".ci/setup/40-lazyfs.sh: $lazyfs_tarball is missing" >&2
        return 1
    fi
    # Built where it stays (the binary finds libpcache.so by the absolute RUNPATH of the
    # build tree); the `built` stamp written last tells a rerun that the build finished.
    rm -rf "$lazyfs_dir"
    mkdir -p "$lazyfs_dir"
    tar -xzf "$lazyfs_tarball" -C "$lazyfs_dir"
    lazyfs_src=$lazyfs_dir/lazyfs-a47a5ba

    # libpcache: Debian's toml11 and spdlog instead of FetchContent downloads.
    perl -0pi -e '
        s{include\(FetchContent\).*?set_target_properties\(spdlog PROPERTIES POSITION_INDEPENDENT_CODE ON\)}
         {find_package(toml11 REQUIRED)\nfind_package(spdlog REQUIRED)}s;
        s{target_link_libraries\(pcache toml11::toml11 spdlog\)}
         {target_link_libraries(pcache toml11::toml11 spdlog::spdlog)};
    ' "$lazyfs_src/libs/libpcache/CMakeLists.txt"
    # lazyfs: no paths into libpcache's _deps (which no longer exist); the packages' targets.
    perl -0pi -e '
        s{link_directories\(\.\./libs/libpcache/build/_deps/spdlog-build/\)\n}{};
        s{include_directories\(\.\./libs/libpcache/build/_deps/spdlog-src/include\)\n}
         {find_package(toml11 REQUIRED)\nfind_package(spdlog REQUIRED)\n};
        s{target_link_libraries\(\$\{CMAKE_PROJECT_NAME\} fuse3 Threads::Threads libpcache.so\)}
         {target_link_libraries(\${CMAKE_PROJECT_NAME} fuse3 Threads::Threads libpcache.so spdlog::spdlog toml11::toml11)};
    ' "$lazyfs_src/lazyfs/CMakeLists.txt"
    # Fail here, naming the file, when an edit did not apply (a different LazyFS version).
    if grep -q FetchContent_Declare "$lazyfs_src/libs/libpcache/CMakeLists.txt" ||
        grep -q '_deps/spdlog' "$lazyfs_src/lazyfs/CMakeLists.txt" ||
        ! grep -q 'spdlog::spdlog toml11::toml11' "$lazyfs_src/lazyfs/CMakeLists.txt"; then
        echo ".ci/setup/40-lazyfs.sh: the CMake edits did not apply to $lazyfs_src" >&2
        return 1
    fi

    # libpcache first (lazyfs links it from its build tree), then lazyfs without its tests
    # (they would fetch googletest). The compiler's chatter goes to build.log, shown on failure.
    if ! {
        cmake -S "$lazyfs_src/libs/libpcache" -B "$lazyfs_src/libs/libpcache/build" \
            -DCMAKE_BUILD_TYPE=Release &&
            cmake --build "$lazyfs_src/libs/libpcache/build" -j 2 &&
            cmake -S "$lazyfs_src/lazyfs" -B "$lazyfs_src/lazyfs/build" \
                -DCMAKE_BUILD_TYPE=Release -DLAZYFS_BUILD_TESTS=OFF &&
            cmake --build "$lazyfs_src/lazyfs/build" -j 2
    } >"$lazyfs_dir/build.log" 2>&1; then
        tail -n 40 "$lazyfs_dir/build.log" >&2
        echo ".ci/setup/40-lazyfs.sh: building LazyFS failed (log: $lazyfs_dir/build.log)" >&2
        return 1
    fi
    touch "$lazyfs_dir/built"
fi

# lazyfs finds libpcache.so through the RUNPATH CMake gives a binary of the build tree.
if ldd "$lazyfs_bin" | grep 'not found'; then
    echo ".ci/setup/40-lazyfs.sh: $lazyfs_bin is missing shared libraries" >&2
    return 1
fi
export QMQPD_LAZYFS=$lazyfs_bin
