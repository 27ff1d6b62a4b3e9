#!/usr/bin/env bash
# Prepares what the workplace's lent H200 needs to run bench/gpu_preflight.py, then prints the device call.
# That machine has torch 2.11 and triton 3.6 on Python 3.12, but no zstandard and no network, and ../shared does
# not travel with the working tree. So this puts the FineWeb sample and the sp1024 tokenizer in .pf/ and the
# zstandard wheel for Python 3.12 in .whl/, both git-ignored through .git/info/exclude (about 22 MB together).
#   bash bench/device_kit.sh            # SHARED_DATA=... if the data is not in ../shared/data
#   BASELINE=/work/.mirror/openai+parameter-golf/repo bash bench/device_kit.sh   # also time the upstream baseline
# BASELINE is the upstream parameter-golf repository (a git dir or clone: its HEAD's root train_gpt.py is taken, the
# commit recorded) or that train_gpt.py itself (its path and sha256 recorded). It is copied, unmodified, into
# .pf/baseline/ (never committed here), with its origin in .pf/baseline/SOURCE, and the call gets
# --baseline .pf/baseline/train_gpt.py (the preflight's train:baseline stage). Without BASELINE the kit warns and
# prints the call without that stage; a BASELINE it cannot read is an error (exit 1), not a silent skip.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${SHARED_DATA:-../shared/data}
baseline=${BASELINE:-}
for dir in .pf .whl; do
  grep -qx "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >> .git/info/exclude
done
rm -rf .pf/baseline  # a stale copy would travel unused, or be mistaken for this one
mkdir -p .pf/data .whl
cp "$shared"/datasets/fineweb_sample_sp1024/fineweb_*.bin .pf/data/
cp "$shared"/tokenizers/fineweb_1024_bpe.model .pf/
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl zstandard==0.25.0
baseline_arg=""
if [[ -z $baseline ]]; then
  echo "device_kit: warning: BASELINE not set, so the call has no train:baseline stage (BASELINE=<upstream parameter-golf repo or its train_gpt.py>)" >&2
else
  mkdir -p .pf/baseline
  if [[ -f $baseline ]]; then
    cp "$baseline" .pf/baseline/train_gpt.py
    echo "file $(realpath "$baseline") sha256 $(sha256sum < "$baseline" | cut -d' ' -f1)" > .pf/baseline/SOURCE
  elif [[ -d $baseline ]] && gitdir=$(git -C "$baseline" rev-parse --absolute-git-dir 2>/dev/null) \
      && [[ $gitdir == "$(realpath "$baseline")" || $gitdir == "$(realpath "$baseline")/.git" ]] \
      && git -C "$baseline" show HEAD:train_gpt.py > .pf/baseline/train_gpt.py 2>/dev/null; then
    # (the repository's own root, not one that merely encloses the folder: this project's would pass its trainer)
    echo "train_gpt.py at commit $(git -C "$baseline" rev-parse HEAD) of $(realpath "$baseline")" > .pf/baseline/SOURCE
  else
    rm -rf .pf/baseline
    echo "device_kit: error: BASELINE=$baseline is neither a file nor the root of a git repository whose HEAD has train_gpt.py" >&2
    exit 1
  fi
  if git show HEAD:train_gpt.py | cmp -s - .pf/baseline/train_gpt.py || cmp -s train_gpt.py .pf/baseline/train_gpt.py; then
    rm -rf .pf/baseline
    echo "device_kit: error: BASELINE=$baseline gives this project's own train_gpt.py, not the upstream baseline" >&2
    exit 1
  fi
  baseline_arg=" --baseline .pf/baseline/train_gpt.py"
  echo "device_kit: baseline: $(cat .pf/baseline/SOURCE)"
fi
cat <<CALL
device run: carry [".pf", ".whl"], timeout_s 540, command:
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && python3 bench/gpu_preflight.py --data .pf/data --tokenizer .pf/fineweb_1024_bpe.model$baseline_arg --out \$OUT/gpu_preflight.md
CALL
