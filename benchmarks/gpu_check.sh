#!/usr/bin/env bash
# The GPU checks of issue 11 in one run (one H100/H200, single process, NCCL backend):
# bf16 DPO steps of the 886M shape with each reference placement and optimizer, the fp32
# baseline side by side, and the default job in bf16. Results land in $OUT (or ./gpu_out).
# Needs torch with CUDA; megatron-core, omegaconf, hydra-core (and antlr4) as wheels in .whl/.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, megatron.core; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'megatron-core', megatron.core.__version__)"
python3 -c "import transformer_engine" 2>/dev/null && echo "transformer-engine: present" || echo "transformer-engine: not installed"

SHAPE="--num-layers 16 --hidden-size 2048 --ffn-hidden-size 5632 --num-attention-heads 16 --num-query-groups 8 --vocab-size 32000 --seq-length 1024 --global-batch-size 16 --micro-batch-size 2"
bench() {  # name, then bench_dpo.py arguments
  local name=$1; shift
  echo "=== $name: bench_dpo.py $SHAPE $*"
  timeout 240 python3 benchmarks/bench_dpo.py $SHAPE "$@" --output "$OUT/bench_dpo.jsonl" --markdown "$OUT/bench_dpo.md" \
    2>&1 | grep -v -i "warn" | tee "$OUT/$name.log" | tail -28
}
bench bf16_resident --precision bf16 --ref-placement device --steps 5 --warmup-steps 2
bench bf16_swapped --precision bf16 --ref-placement cpu --steps 3 --warmup-steps 1
bench bf16_sharded --precision bf16 --optimizer distributed_fused_adam --ref-placement device --steps 3 --warmup-steps 1
bench fp32_resident --precision 32 --ref-placement device --steps 2 --warmup-steps 1

echo "=== default job, bf16"
timeout 180 python3 examples/train_gpt_dpo.py trainer.precision=bf16 exp_manager.explicit_log_dir="$OUT/default_bf16" \
  exp_manager.create_checkpoint_callback=False > "$OUT/default_bf16.log" 2>&1
echo "exit $?"
python3 - "$OUT/default_bf16/metrics.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "val/acc" in r:
        print("step", r["step"], "val/acc", round(r["val/acc"], 4), "val/loss", round(r["val/loss"], 4))
PY
