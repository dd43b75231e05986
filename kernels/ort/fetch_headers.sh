#!/usr/bin/env bash
# Fetches ONNX Runtime's C/C++ API headers (the PyPI wheel has none) from Debian's
# libonnxruntime-dev in the trixie suite, without adding trixie to the system's apt sources:
# a private apt state under DEST holds the trixie package lists; the .deb is only unpacked.
#
#   kernels/ort/fetch_headers.sh [DEST]    # default build/onnxruntime-headers
#
# Result: DEST/include/onnxruntime_c_api.h ... and DEST/VERSION (the Debian package version).
# Exit 2 with one line when apt or the network is unavailable.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
dest=$(realpath -m "${1:-$root/build/onnxruntime-headers}")  # apt needs absolute Dir:: paths
pkg=libonnxruntime-dev
suite=${SPFQ_ORT_SUITE:-trixie}
command -v apt-get >/dev/null || { echo "fetch_headers.sh: apt-get not found (Debian needed for $pkg)" >&2; exit 2; }
tmp=$(mktemp -d "${dest%/}.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/deb"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" > "$tmp/sources"
apt_opts=(-o "Dir::Etc::SourceList=$tmp/sources" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o Debug::NoLocking=1
          -o APT::Sandbox::User=root)
# apt-get update exits 0 even when a fetch failed; retry the pair a few times (mirrors flake)
ok=0
for attempt in 1 2 3; do
    if apt-get -qq "${apt_opts[@]}" update && (cd "$tmp/deb" && apt-get -qq "${apt_opts[@]}" download "$pkg"); then
        ok=1; break
    fi
    echo "fetch_headers.sh: attempt $attempt to fetch $pkg from Debian $suite failed; retrying" >&2
    sleep $((attempt * 5))
done
[ $ok = 1 ] || { echo "fetch_headers.sh: cannot download $pkg from Debian $suite (network?)" >&2; exit 2; }
deb=$(ls "$tmp"/deb/*.deb)
dpkg-deb -x "$deb" "$tmp/x"
mkdir -p "$tmp/out/include"
cp -r "$tmp"/x/usr/include/onnxruntime/. "$tmp/out/include/"
dpkg-deb -f "$deb" Version > "$tmp/out/VERSION"
rm -rf "$dest"
mv "$tmp/out" "$dest"
echo "ONNX Runtime headers $(cat "$dest/VERSION") ($suite $pkg) in $dest"
