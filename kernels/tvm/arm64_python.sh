#!/usr/bin/env bash
# An arm64 Python that runs under qemu-aarch64 with only the device's runtime packages, for running
# TVM-exported libraries (run_tvm.py) and the ONNX custom-op flavour (run_onnx.py) on this x86-64
# host: Debian bookworm's arm64 python3.11 debs are unpacked into DEST/root (nothing is
# installed; the system's apt sources are not changed: a private apt state under DEST lists
# bookworm arm64), and aarch64 wheels of numpy, apache-tvm and apache-tvm-ffi (pinned to the
# host's versions) and onnxruntime (the version targets/arm64.toml names) into DEST/site.
#
#   kernels/tvm/arm64_python.sh [DEST]     # default build/arm64-python (make arm64-python)
#   DEST/python3 run_tvm.py model.arm64.so inputs.npz    # wrapper: qemu-aarch64 + env
#   DEST/python3 run_onnx.py model.spfq.onnx inputs.npz --library lib/arm64/libspfq_ort.so
#
# Does nothing when DEST/VERSION already names these versions.
# Exit 2 with one line when apt, pip or the network is unavailable.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
dest=$(realpath -m "${1:-$root/build/arm64-python}")  # apt needs absolute Dir:: paths
py=${PYTHON:-$root/.venv/bin/python}
tvm_v=$("$py" -c "import tvm; print(tvm.__version__)")
ffi_v=$("$py" -c "import tvm_ffi; print(tvm_ffi.__version__)")
np_v=$("$py" -c "import numpy; print(numpy.__version__)")
# onnxruntime: the version targets/arm64.toml names (the host's 1.31 segfaults at import under qemu-user)
ort_spec=$(cd "$root" && "$py" -c "from spfq_deploy.targets import get_target; print(next(p for p in get_target('arm64').runtime_packages if p.startswith('onnxruntime==')))")
want="numpy==$np_v apache-tvm==$tvm_v apache-tvm-ffi==$ffi_v $ort_spec; debian bookworm python3.11 arm64"
# already there for these versions: nothing to download (make's stamp is DEST/VERSION)
if [ -x "$dest/python3" ] && [ "$(cat "$dest/VERSION" 2>/dev/null)" = "$want" ]; then
    touch "$dest/VERSION"; echo "arm64 python in $dest is up to date ($want)"; exit 0
fi
debs=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 zlib1g libexpat1 libffi8 libssl3
      libbz2-1.0 liblzma5 libgcc-s1 libstdc++6 libuuid1 libsqlite3-0 libncursesw6 libtinfo6 libreadline8
      libcrypt1 libgomp1)
tmp=$(mktemp -d "${dest%/}.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/apt/lists/partial" "$tmp/apt/cache/archives/partial" "$tmp/debs" "$tmp/wheels" "$tmp/out/root" "$tmp/out/site"
echo "deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main" > "$tmp/apt/sources"
o=(-o "Dir::Etc::SourceList=$tmp/apt/sources" -o Dir::Etc::SourceParts=/dev/null -o "Dir::State::Lists=$tmp/apt/lists"
   -o "Dir::Cache=$tmp/apt/cache" -o Debug::NoLocking=1 -o APT::Sandbox::User=root -o APT::Architecture=arm64
   -o APT::Architectures::=arm64)
apt-get -qq "${o[@]}" update || { echo "arm64_python.sh: cannot read Debian bookworm arm64 package lists (network?)" >&2; exit 2; }
(cd "$tmp/debs" && apt-get -qq "${o[@]}" download "${debs[@]}") \
    || { echo "arm64_python.sh: cannot download the arm64 python3.11 debs" >&2; exit 2; }
for d in "$tmp"/debs/*.deb; do dpkg-deb -x "$d" "$tmp/out/root"; done
"$py" -m pip download -q --only-binary=:all: --platform manylinux_2_28_aarch64 --python-version 3.11 \
    --implementation cp -d "$tmp/wheels" "numpy==$np_v" "apache-tvm==$tvm_v" "apache-tvm-ffi==$ffi_v" \
    || { echo "arm64_python.sh: cannot download the aarch64 wheels (numpy $np_v, apache-tvm $tvm_v, apache-tvm-ffi $ffi_v)" >&2; exit 2; }
# onnxruntime alone: InferenceSession needs only numpy (its other requirements serve its tools)
"$py" -m pip download -q --only-binary=:all: --no-deps --platform manylinux_2_28_aarch64 \
    --platform manylinux_2_27_aarch64 --python-version 3.11 --implementation cp -d "$tmp/wheels" "$ort_spec" \
    || { echo "arm64_python.sh: cannot download the aarch64 wheel $ort_spec" >&2; exit 2; }
for w in "$tmp"/wheels/*.whl; do "$py" -m zipfile -e "$w" "$tmp/out/site"; done
cat > "$tmp/out/python3" <<'SH'
#!/usr/bin/env bash
# python3.11 for aarch64 under qemu-aarch64 (user mode), with the unpacked runtime packages
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export QEMU_LD_PREFIX=$here/root PYTHONHOME=$here/root/usr PYTHONPATH=$here/site${PYTHONPATH:+:$PYTHONPATH}
exec qemu-aarch64 "$here/root/usr/bin/python3.11" "$@"
SH
chmod +x "$tmp/out/python3"
echo "$want" > "$tmp/out/VERSION"
rm -rf "$dest"
mv "$tmp/out" "$dest"
echo "arm64 python in $dest ($(cat "$dest/VERSION"))"
