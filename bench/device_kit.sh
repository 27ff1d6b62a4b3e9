#!/usr/bin/env bash
# Prepares what the workplace's lent H200 needs to run bench/gpu_preflight.py, then prints the device call.
# That machine has torch 2.11 and triton 3.6 on Python 3.12, but no zstandard and no network, and ../shared does
# not travel with the working tree. So this puts the FineWeb sample and the sp1024 tokenizer in .pf/ and the
# zstandard wheel for Python 3.12 in .whl/, both git-ignored through .git/info/exclude (about 22 MB together).
#   bash bench/device_kit.sh            # SHARED_DATA=... if the data is not in ../shared/data
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${SHARED_DATA:-../shared/data}
for dir in .pf .whl; do
  grep -qx "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >> .git/info/exclude
done
mkdir -p .pf/data .whl
cp "$shared"/datasets/fineweb_sample_sp1024/fineweb_*.bin .pf/data/
cp "$shared"/tokenizers/fineweb_1024_bpe.model .pf/
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl zstandard==0.25.0
cat <<'CALL'
device run: carry [".pf", ".whl"], timeout_s 540, command:
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && python3 bench/gpu_preflight.py --data .pf/data --tokenizer .pf/fineweb_1024_bpe.model --out $OUT/gpu_preflight.md
CALL
