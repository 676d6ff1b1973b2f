#!/usr/bin/env bash
# The lent-GPU runs behind docs/benchmarks.md and docs/convergence.md (docs/benchmarks.md, "How the GPU numbers
# were made"). The travelling tree is capped at 64 MiB, so the 98 MB GGUF goes in three calls made back to back
# (the machine stays warm 30 s): `part` copies the carried third (.carryA, .carryB, .carryC) to /tmp/g; `start`
# joins them and starts bench/convergence.py in its own session, so it outlives the call; `wait` follows it for
# up to 9 minutes and copies its outputs to $OUT. Wheels missing there travel in .whl.
# The outputs the docs cite are kept in docs/runs/gpu/.
#   NAME=convergence (default) | ablation: the run's outputs /tmp/g/out/NAME.*, taken over from .carry3/prev/NAME.json;
#   DATA: the task's train/validation/test.jsonl folder (default .carry3/sentiment)
#   steptime: bench/step_time.py on $DATA before anything else shares the GPU
#   product LR STEPS [NAME [FLAGS]]: `edgezo tune` ZO-MOPI on the same task, in the background too (docs/convergence.md)
#   default STEPS: `edgezo tune` with no --optimizer and no --lr on the same task (what `auto` gives a new user)
set -uo pipefail
stage=$1; shift
mkdir -p /tmp/g/out /tmp/site
if [ ! -f /tmp/g/wheels.done ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >/dev/null 2>&1 && touch /tmp/g/wheels.done
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 EDGEZO_CACHE=/tmp/g/cache
GGUF=/tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf NAME=${NAME:-convergence} DATA=${DATA:-.carry3/sentiment}
sentiment_template() { python3 -c 'from bench.sentiment_data import TEMPLATE; print(TEMPLATE)'; }  # its one definition
running() { for p in /tmp/g/*.pid; do kill -0 "$(cat "$p")" 2>/dev/null && return 0; done; return 1; }
copy_out() {
  for m in /tmp/g/*/metrics.jsonl; do [ -f "$m" ] && cp "$m" /tmp/g/out/"$(basename "$(dirname "$m")")"_metrics.jsonl; done
  cp /tmp/g/out/* "$OUT/" 2>/dev/null; for f in /tmp/g/out/*.log; do echo "== $f"; tail -n 25 "$f"; done
}
join_gguf() {  # the third part travels with this call
  if [ ! -f $GGUF ]; then
    cp .carryC/gp0* /tmp/g/ && cat /tmp/g/gp00 /tmp/g/gp01 /tmp/g/gp02 > $GGUF && sha256sum $GGUF | cut -c1-16
  fi
}
case $stage in
  part)  cp .carry[ABC]/gp0* /tmp/g/ && ls -la /tmp/g && nvidia-smi --query-gpu=name,memory.used --format=csv ;;
  steptime) # seconds per step of each method's defaults on one batch of $DATA, alone on the GPU (bench/step_time.py);
         # DATASET names its prompt, RESULTS a convergence .json on it (adds the time to its target)
         join_gguf
         python3 bench/step_time.py --model $GGUF --device cuda --data $DATA --dataset ${DATASET:-sentiment} \
           ${RESULTS:+--results $RESULTS} 2>&1 | grep -v Warn | tee $OUT/step_time_${NAME}_gpu.log ;;
  chain) # chain SCRIPT: run a bash file of blocking commands in the background (GGUF, OUT=/tmp/g/out set), so
         # the GPU never waits for the next call; `wait` follows it
         join_gguf
         GGUF=$GGUF OUT=/tmp/g/out setsid nohup bash "$1" > /tmp/g/out/chain.log 2>&1 < /dev/null &
         echo $! > /tmp/g/chain.pid; sleep 30; copy_out ;;
  start) # start ARGS...: ARGS go to bench/convergence.py
         join_gguf
         cp .carry3/prev/$NAME.json /tmp/g/out/$NAME.json 2>/dev/null
         if [ "${MPS:-0}" = 1 ]; then  # MPS lets the workers' kernels share the GPU instead of taking turns
           nvidia-cuda-mps-control -d && timeout 90 python3 -c "import torch; print('mps ok', torch.ones(2, device='cuda').sum().item())" \
             || { echo quit | nvidia-cuda-mps-control; echo "MPS failed: running without it"; }
         fi
         setsid nohup python3 bench/convergence.py --model $GGUF --device cuda --data $DATA \
           --out /tmp/g/out/$NAME.png --resume "$@" > /tmp/g/out/$NAME.log 2>&1 < /dev/null &
         echo $! > /tmp/g/$NAME.pid; sleep 60; copy_out ;;
  product) # product LR STEPS [NAME [TUNE FLAGS...]]: seed 0, batch 16, eval on the test split every 11 steps (~100 forwards)
         lr=$1 steps=$2 name=${3:-tune}; shift $(( $# < 3 ? $# : 3 ))
         join_gguf
         setsid nohup python3 -m edgezo tune $GGUF .carry3/sentiment/train.jsonl --task classify --optimizer zo-mopi \
           --lr "$lr" --steps "$steps" --seed 0 --batch-size 16 --max-length 128 --eval-every 11 --checkpoint-every 1000 \
           --eval-data .carry3/sentiment/test.jsonl --template "$(sentiment_template)" --device cuda --out /tmp/g/$name "$@" \
           > /tmp/g/out/$name.log 2>&1 < /dev/null &
         echo $! > /tmp/g/$name.pid; sleep 20; copy_out ;;
  default) # default STEPS: `edgezo tune` as a new user runs it (no --optimizer, no --lr), sentiment, seed 0, blocking
         join_gguf
         python3 -m edgezo tune $GGUF .carry3/sentiment/train.jsonl --task classify --steps "$1" --seed 0 \
           --batch-size 16 --max-length 128 --eval-every 25 --eval-data .carry3/sentiment/test.jsonl \
           --template "$(sentiment_template)" --device cuda --out /tmp/g/default 2>&1 | grep -v Warn | tail -n 5
         cp /tmp/g/default/metrics.jsonl /tmp/g/default/run.json "$OUT/"
         python3 -c "import json; [print(r['step'], r['forwards'], r.get('eval_accuracy', r.get('accuracy'))) for r in map(json.loads, open('/tmp/g/default/metrics.jsonl')) if 'eval_loss' in r]"
         python3 -c "import json; print(json.load(open('/tmp/g/default/run.json'))['settings']['optimizer'])" ;;
  wait)  # wait SECONDS: until every background run ends or SECONDS pass
         for _ in $(seq "${1:-540}"); do running || break; sleep 1; done
         copy_out; running && echo "STILL RUNNING" || echo "FINISHED" ;;
  compare) # the step before (.carry_base: an older tree, e.g. `git archive REV edgezo bench`) and now, same card
         for t in .carry_base .; do for b in 1 32; do
           echo "== $t batch $b"; PYTHONPATH=/tmp/site:$PWD/$t python3 $t/bench/speed.py --device cuda --shape opt-6.7b \
             --precision fp16 --batch $b --seq 128 2>&1 | grep -v Warn
         done; done 2>&1 | tee $OUT/speed_compare.log
         for b in 1 32; do
           python3 bench/speed.py --device cuda --shape opt-6.7b --precision fp16 --batch $b --seq 128 --repeats 3 \
             --profile 2>&1 | grep -v Warn > $OUT/speed_opt67_b${b}_profile.log
           python3 bench/memory.py --device cuda --shape opt-6.7b --precision fp16 --batch $b --seq 128 \
             --optimizers zo-mopi --state-dtypes fp16 2>&1 | tee $OUT/memory_opt67_b$b.log | tail -n 4
         done
         echo "== .carry_base memory, batch 1"  # the memory before, on the same card
         PYTHONPATH=/tmp/site:$PWD/.carry_base python3 .carry_base/bench/memory.py --device cuda --shape opt-6.7b \
           --precision fp16 --batch 1 --seq 128 --optimizers zo-mopi --state-dtypes fp16 2>&1 \
           | tee $OUT/memory_opt67_b1_base.log | tail -n 4 ;;
  offload) # the state in host memory (offload_state): its tests on the GPU, then speed and memory beside resident state
         python3 -m pytest -q -p no:cacheprovider tests/test_offload.py tests/test_graphed.py tests/test_cli.py \
           -k "offload or graph" 2>&1 | tail -n 5 \
           | tee $OUT/test_offload_cuda.log
         python3 bench/speed.py --device cuda --shape opt-6.7b --precision fp16 --batch ${BATCH:-1,32} --seq 128 \
           --repeats 3 --state-dtype fp16 --offload-state ${PROFILE:+--profile} ${TRACE:+--trace $OUT} 2>&1 \
           | grep -v Warn > $OUT/speed_opt67_offload.log
         grep -E "state in host|fused step parts|op calls|^fp16" $OUT/speed_opt67_offload.log
         [ -z "${NOMEM:-}" ] && python3 bench/memory.py --device cuda --shape opt-6.7b --precision ${PRECISIONS:-fp16} --batch 1 --seq 128 \
           --optimizers zo-mopi --state-dtypes fp16 --offload-state --fuse all 2>&1 \
           | tee $OUT/memory_opt67_b1_offload.log | tail -n 10 | head -n 8
         [ -n "${B32:-}" ] && python3 bench/memory.py --device cuda --shape opt-6.7b --precision fp16 --batch 32 --seq 128 \
           --optimizers zo-mopi --state-dtypes fp16 --offload-state 2>&1 | tee $OUT/memory_opt67_b32_offload.log | tail -n 10
         true ;;
  nf4)   # bitsandbytes nf4 bases: speed at both shapes, memory at OPT-6.7B (fp16 beside it, M and V fp16 too)
         for shape in opt-1.3b opt-6.7b; do
           python3 bench/speed.py --device cuda --shape $shape --precision bnb-nf4 --batch 1,32 --seq 128 --repeats 3 \
             2>&1 | grep -v Warn | tee $OUT/speed_${shape}_nf4.log | tail -n 4
         done
         python3 bench/memory.py --device cuda --shape opt-6.7b --precision fp16,bnb-nf4 --batch 1 --seq 128 \
           --optimizers zo-mopi --state-dtypes fp16 2>&1 | tee $OUT/memory_opt67_nf4.log | tail -n 12 ;;
  bench) python3 bench/speed.py --device cuda --shape opt-6.7b --precision fp16 --batch 1 --seq 128 --profile 2>&1 | tee $OUT/speed_opt67_b1.log
         python3 bench/speed.py --device cuda --shape opt-6.7b --precision fp16 --batch 32 --seq 128 2>&1 | tee $OUT/speed_opt67_b32.log
         python3 bench/memory.py --device cuda --shape opt-6.7b --precision fp16 --batch 1 --seq 128 2>&1 | tee $OUT/memory_opt67_b1.log
         python3 bench/memory.py --device cuda --shape opt-1.3b --precision fp16 --precision bnb-nf4 --batch 8 --seq 128 2>&1 | tee $OUT/memory_opt13.log ;;
  nccl)  python3 bench/distributed.py --device cuda --shape opt-1.3b --dtype fp16 --batch 32 --seq 128 --rank 64 --k 32 2>&1 | tee $OUT/distributed_opt13.log
         python3 bench/speed.py --device cuda --shape opt-1.3b --precision fp16 --batch 32 --seq 128 --profile 2>&1 | tee $OUT/speed_opt13_b32.log ;;
esac
