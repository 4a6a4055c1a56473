#!/usr/bin/env bash
# The Python packages bench/gpu_suite.py needs that the lent GPU machines' image lacks, fetched
# here (that machine reaches no registry) and packed for the device tool's `carry`:
#
#     bash bench/gpu_wheels.sh            # writes .whl/site.tar.xz (git-ignored), ~40 MB
#
# The image has torch, torchvision, transformers, tokenizers, safetensors, numpy, pyarrow,
# pandas, pillow, fsspec, aiohttp, grpcio, requests, protobuf, pyyaml, click, msgpack, attrs
# (/work/.library/device/KINDS.md). Missing: Ray with what `ray[data,train]` needs (jsonschema
# and its parts, pydantic and its parts, tensorboardX), segment-anything, webdataset,
# braceexpand, pycocotools; typing-extensions is carried for pydantic's floor. Versions are the
# ones the tests run with. Ray's dashboard extras (`ray[default]`) are left out: the suite
# starts Ray without the dashboard. The wheels are unpacked into one folder (what pip's install
# does for these wheels), Ray's parts that no job here imports are removed (its Java jars,
# RLlib, Serve, LLM, the dashboard's web page: 79 MB of wheel do not fit the 64 MiB the device
# tool carries), and the folder is packed with xz. On the GPU machine:
#
#     tar -xJf .whl/site.tar.xz -C /tmp && export PYTHONPATH=/tmp/site:$PWD
#
# PYTHON_VERSION (default 3.12, the GPU image's) and OUT (default .whl) may be set, e.g. to
# build a 3.11 copy for a check on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
OUT=${OUT:-.whl}
PACKAGES=(
    ray==2.60.0
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0 tensorboardX==2.6.5
    segment-anything==1.0 webdataset==1.0.2 braceexpand==0.1.7 pycocotools==2.0.11
)
grep -qxF "/$OUT/" .git/info/exclude 2>/dev/null || grep -qxF "/$OUT/" .gitignore ||
    echo "/$OUT/" >>"$(git rev-parse --git-path info/exclude)"
mkdir -p "$OUT/download"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$OUT/download" "${PACKAGES[@]}"
site="$OUT/site"
rm -rf "$site" && mkdir -p "$site"
for name in "${PACKAGES[@]}"; do  # exactly the pinned wheels, whatever else the folder holds
    stem=$(echo "${name%%==*}" | tr 'A-Z-' 'a-z_')
    wheel=$(ls "$OUT/download" | grep -i "^${stem}-${name##*==}-" | head -1)
    [ -n "$wheel" ] || { echo "no wheel for $name in $OUT/download" >&2; exit 1; }
    unzip -q -o "$OUT/download/$wheel" -d "$site"
done
rm -rf "$site"/*.data "$site"/ray/{jars,rllib,serve,llm,dashboard/client/build} "$site"/bin
find "$site" -name '*.js.map' -delete
tar -C "$OUT" -cJf "$OUT/site.tar.xz" site
rm -rf "$site" "$OUT/download"
du -h "$OUT/site.tar.xz"
