#!/usr/bin/env bash
# job.sh <row> <seed>: EVAL_ONLY of the proxy capacity run's fill_cap artifact (7 layers, MLP 4x, 194 steps)
row=$1; seed=$2
case $row in
  sgd) extra="TTT_MODE=sgd TTT_EPOCHS=3" ;;
  lora) extra="TTT_MODE=lora TTT_EPOCHS=1 TTT_PHASES=0" ;;
  phased) extra="TTT_MODE=lora TTT_EPOCHS=1 TTT_PHASES=2 TTT_PHASE_DOCS=16" ;;
esac
cd /tmp/tttcmp && env OMP_NUM_THREADS=1 $(python3 -c "import sys; sys.path.insert(0, '/work/main'); from bench.configs import SCALES; print(' '.join(f'{k}={v}' for k, v in SCALES['proxy'].items()))") \
  NUM_LAYERS=7 MLP_MULT=4 DATA_PATH=/tmp/proxy_k/work/data_val131072 TOKENIZER_PATH=/work/shared/data/tokenizers/fineweb_1024_bpe.model \
  ARTIFACT_PATH=/tmp/proxy_k/work/fill_cap_seed$seed.ptz EVAL_ONLY=1 SEED=$seed RUN_ID=${row}_seed$seed MAX_EVAL_SECONDS=0 $extra \
  python3 /tmp/tttcmp/code/train_gpt.py > logs/${row}_seed$seed.out 2>&1
echo "$row $seed rc=$?" >> queue.log
