#!/usr/bin/env bash
# The lent-GPU runs behind docs/benchmarks.md and docs/convergence.md (see docs/benchmarks.md, "How the GPU
# numbers were made"). The GGUF travels in two halves (.carry1, .carry2); wheels missing there in .whl*.
set -uo pipefail
stage=$1
mkdir -p /tmp/g /tmp/site
for w in .whl/*.whl .whlbnb/*.whl; do [ -f "$w" ] && cp "$w" /tmp/g/; done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/g/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 EDGEZO_CACHE=/tmp/g/cache
GGUF=/tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf
case $stage in
  part1) cp .carry1/* /tmp/g/ && python3 -c "import torch, transformers, gguf, datasets; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())" ;;
  part2) cp .carry2/* /tmp/g/ && cat /tmp/g/gguf.part00 /tmp/g/gguf.part01 > $GGUF && sha256sum $GGUF | cut -c1-16
         shift; python3 bench/convergence.py --model $GGUF --device cuda --out $OUT/convergence.png "$@" 2>&1 | tee $OUT/convergence.log ;;
  bench) python3 bench/speed.py --device cuda --shape opt-6.7b --precision fp16 --batch 1 --seq 128 --profile 2>&1 | tee $OUT/speed_opt67_b1.log
         python3 bench/speed.py --device cuda --shape opt-6.7b --precision fp16 --batch 32 --seq 128 2>&1 | tee $OUT/speed_opt67_b32.log
         python3 bench/memory.py --device cuda --shape opt-6.7b --precision fp16 --batch 1 --seq 128 2>&1 | tee $OUT/memory_opt67_b1.log
         python3 bench/memory.py --device cuda --shape opt-1.3b --precision fp16 --precision bnb-nf4 --batch 8 --seq 128 2>&1 | tee $OUT/memory_opt13.log ;;
  nccl)  python3 bench/distributed.py --device cuda --shape opt-1.3b --dtype fp16 --batch 32 --seq 128 --rank 64 --k 32 2>&1 | tee $OUT/distributed_opt13.log
         python3 bench/speed.py --device cuda --shape opt-1.3b --precision fp16 --batch 32 --seq 128 --profile 2>&1 | tee $OUT/speed_opt13_b32.log ;;
esac
