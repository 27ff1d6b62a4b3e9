#!/usr/bin/env bash
# The main job on a fresh machine: install the requirements, then train, export and evaluate.
#   * FineWeb at data/datasets/fineweb10B_sp1024 and CUDA GPUs: the real run, one process per GPU.
#   * Otherwise: the CPU smoke run (about 4 minutes on 2 cores) on a generated synthetic sample,
#     NOT FineWeb; it ends by printing the sample's entropy, the best bpb any model could reach, and a few
#     greedy tokens from the artifact (tools/sample.py): the whole path works end to end, no claim of quality.
# Any setting can be overridden from the environment, e.g. `MAX_WALLCLOCK_SECONDS=60 bash run.sh`.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q -r requirements.txt

if python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" \
    && compgen -G "data/datasets/fineweb10B_sp1024/fineweb_train_*.bin" >/dev/null; then
  gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
  echo "run: FineWeb and ${gpus} GPU(s) found: full run"
  exec torchrun --standalone --nproc_per_node="${gpus}" train_gpt.py
fi

echo "run: no CUDA GPU or no FineWeb shards: CPU smoke run on the synthetic sample (not FineWeb)"
python3 -m data.make_smoke_data
export DATA_PATH="${DATA_PATH:-data/datasets/smoke_sp1024}" TOKENIZER_PATH="${TOKENIZER_PATH:-data/tokenizers/smoke_1024_bpe.model}"
export RUN_ID="${RUN_ID:-smoke}" ARTIFACT_PATH="${ARTIFACT_PATH:-smoke_model.int6.ptz}"
export NUM_LAYERS="${NUM_LAYERS:-4}" MODEL_DIM="${MODEL_DIM:-128}" NUM_HEADS="${NUM_HEADS:-2}" NUM_KV_HEADS="${NUM_KV_HEADS:-1}"
export TRAIN_SEQ_LEN="${TRAIN_SEQ_LEN:-256}" TRAIN_BATCH_TOKENS="${TRAIN_BATCH_TOKENS:-8192}"
export MEM_CHUNK="${MEM_CHUNK:-32}" MEM_TOPK="${MEM_TOPK:-2}" ITERATIONS="${ITERATIONS:-100000}" WARMDOWN_ITERS="${WARMDOWN_ITERS:-60}"
export WARMUP_STEPS="${WARMUP_STEPS:-2}" MAX_WALLCLOCK_SECONDS="${MAX_WALLCLOCK_SECONDS:-150}"
export TRAIN_LOG_EVERY="${TRAIN_LOG_EVERY:-25}" VAL_LOSS_EVERY="${VAL_LOSS_EVERY:-0}" VAL_BATCH_SIZE="${VAL_BATCH_SIZE:-65536}"
python3 train_gpt.py
python3 -c "import json; s = json.load(open('${DATA_PATH}/source.json')); print(f\"smoke_source entropy_bpb:{s['entropy_bits_per_byte']:.4f} unigram_bpb:{s['unigram_bits_per_byte']:.4f} (the model's val_bpb can approach the first, should beat the second)\")"
python3 tools/sample.py --artifact "${ARTIFACT_PATH}" --prompt "the" --max-new-tokens 24 --temperature 0
