#!/usr/bin/env bash
# receive_bound.py's "native loop" modes: this crate built offline from Debian's packaged
# crates (librust-*-dev) into .bench-tools/native, after install-tools.sh. A benchmark's
# bound, not part of the package.
set -euo pipefail
cd "$(dirname "$0")/../.."
py=.bench-tools/native/bin/python
[ -x "$py" ] || { echo "run benchmarks/install-tools.sh first" >&2; exit 1; }
need=(librust-pyo3-dev librust-blake3-dev librust-libc-dev)
command -v cargo >/dev/null || need+=(cargo)
if ! dpkg -s "${need[@]}" >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
(cd benchmarks/native-loop && PYO3_PYTHON="$PWD/../../$py" cargo build --release -q)
dest=$("$py" -c 'import sysconfig as s; print(s.get_path("platlib") + "/native_loop" + s.get_config_var("EXT_SUFFIX"))')
cp benchmarks/native-loop/target/release/libnative_loop.so "$dest"
"$py" -c 'import native_loop'
echo "built $dest"
