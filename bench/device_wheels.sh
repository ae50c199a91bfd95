#!/usr/bin/env bash
# Builds, in the checkout, the folders a benchmark carries to a lent GPU machine, which reaches no
# package index and has Python 3.12, torch, transformers, h5py and numpy but not dagster, fair-esm,
# polars, lmdb or ray. A call carries at most 64 MiB, so:
#   .wD         the dagster set, fair-esm, polars 1.31.0 (polars 2.x's runtime wheel alone is 54 MB), lmdb
#   .wR1, .wR2  what Ray adds to .wD (ray[default] 2.60.0 and dagster-ray 0.4.8 with their needs); Ray's
#               79 MB wheel is cut in two, one part per folder, carried in two calls to one warm machine
#               that has .wD installed already
#   .benchdata  the genomes of ../shared/data/real (../shared does not travel)
# On the machine (pip --target skips a top-level folder that is there already, such as protobuf's
# `google`, so the Ray set is installed in one pip call into a folder of its own):
#   mkdir -p /tmp/wr && cp .wD/*.whl /tmp/wr/ && pip install -q --no-deps --target /tmp/site .wD/*.whl
#   export PYTHONPATH=/tmp/site:$PWD                                          (the call with .wD)
#   cp .wR1/* /tmp/wr/                                                        (the call with .wR1)
#   cp .wR2/* /tmp/wr/ && cat /tmp/wr/ray.part.* > /tmp/wr/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl \
#     && rm /tmp/wr/ray.part.* && pip install -q --no-deps --target /tmp/siteray /tmp/wr/*.whl
#   export PYTHONPATH=/tmp/siteray:$PWD                                       (the call with .wR2)
# Usage: bench/device_wheels.sh   (from anywhere; needs pip and the package index here)
set -euo pipefail
cd "$(dirname "$0")/.."

# The packages the lent machine's image already has (the device README's KINDS.md list), in pip's
# normalised form. Ray's own needs that some machines lacked are not listed, so they always travel.
ON_DEVICE=" absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio botorch
certifi charset-normalizer cloudpickle colorama contourpy cuda-bindings cuda-core cuda-pathfinder
cycler cython einops fonttools frozenlist fsspec grpcio h11 h5py hf-xet httpcore httpx huggingface-hub
idna iniconfig jinja2 joblib kiwisolver markdown markdown-it-py markupsafe matplotlib mdurl ml-dtypes
mpmath multidict networkx ninja numpy pandas pillow pip pluggy portalocker prometheus-client propcache
psutil pyarrow pygments pyparsing pytest python-dateutil regex rich safetensors scipy sentencepiece
setuptools shellingham six sympy tokenizers torch tqdm transformers triton typer typing-extensions
urllib3 wheel wrapt yarl zipp "
ON_DEVICE=" $(echo $ON_DEVICE) "  # one line, each name between spaces
# Ray 2.60 wants protobuf < 7; the image's is 7.x, so Ray's set carries its own.
RAY_KEEPS=" protobuf msgpack requests pyyaml click filelock packaging attrs "

download() {  # download DEST REQUIREMENT...: CPython 3.12 x86-64 wheels with their needs
    local dest=$1; shift
    python3 -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "$@"
}

prune() {  # prune DIR KEEP: removes the wheels of packages the machine already has
    local dir=$1 keep=$2 whl name
    for whl in "$dir"/*.whl; do
        name=$(basename "$whl" | cut -d- -f1 | tr '[:upper:]_.' '[:lower:]--')
        if [[ $ON_DEVICE == *" $name "* && $keep != *" $name "* ]]; then rm "$whl"; fi
    done
}

grep -qxF '/.w*/' .git/info/exclude 2>/dev/null || printf '/.w*/\n/.benchdata/\n' >> .git/info/exclude
rm -rf .wD .wR1 .wR2 .benchdata /tmp/vnp_ray_wheels

download .wD dagster==1.13.27 dagster-pipes==1.13.27 dagster-shared==1.13.27 fair-esm==2.0.0 \
    polars==1.31.0 lmdb==3.0.0
prune .wD " "

download /tmp/vnp_ray_wheels "ray[default]==2.60.0" dagster-ray==0.4.8 dagster==1.13.27 "protobuf<7"
prune /tmp/vnp_ray_wheels "$RAY_KEEPS"
for whl in .wD/*.whl; do rm -f "/tmp/vnp_ray_wheels/$(basename "$whl")"; done  # .wD is on the machine already
mkdir .wR1 .wR2
split -n 2 /tmp/vnp_ray_wheels/ray-2.60.0-*.whl /tmp/vnp_ray_wheels/ray.part.
rm /tmp/vnp_ray_wheels/ray-2.60.0-*.whl
mv /tmp/vnp_ray_wheels/ray.part.aa .wR1/
mv /tmp/vnp_ray_wheels/ray.part.ab .wR2/
# Ray's other needs, largest first, into the lighter folder.
for whl in $(ls -S /tmp/vnp_ray_wheels/*.whl); do
    if (( $(du -sb .wR1 | cut -f1) <= $(du -sb .wR2 | cut -f1) )); then mv "$whl" .wR1/; else mv "$whl" .wR2/; fi
done

mkdir -p .benchdata/real && cp ../shared/data/real/*.fasta .benchdata/real/
du -sh .wD .wR1 .wR2 .benchdata
