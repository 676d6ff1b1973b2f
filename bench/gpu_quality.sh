# The GPU runs behind docs/convergence.md's second task and lean rows (bench/run_gpu.sh chain bench/gpu_quality.sh).
# One after another, each alone on the card: the news comparison with each method's defaults
# (fo-lora first: it is what `auto` picks), ZO-MOPI at its memory floor on sentiment beside the earlier runs there,
# then each task's step times with the time to its target.
set -x
python3 bench/convergence.py --model $GGUF --device cuda --data .carry3/news --dataset news --sweep-forwards 0 \
  --methods fo-lora,zo-mopi,zo-muon --max-minutes ${NEWS_MINUTES:-12} --out $OUT/news.png > $OUT/news.log 2>&1
cp .carry3/prev/sentiment.json $OUT/sentiment.json
python3 bench/convergence.py --model $GGUF --device cuda --data .carry3/sentiment --sweep-forwards 0 --resume \
  --methods zo-mopi,zo-muon,fo-lora,zo-mopi-lean --max-minutes ${LEAN_MINUTES:-5} --out $OUT/sentiment.png \
  > $OUT/sentiment.log 2>&1
python3 bench/step_time.py --model $GGUF --device cuda --data .carry3/sentiment --results $OUT/sentiment.json 2>&1 \
  | grep -v Warn > $OUT/step_time_sentiment_gpu.log
python3 bench/step_time.py --model $GGUF --device cuda --data .carry3/news --dataset news --results $OUT/news.json \
  2>&1 | grep -v Warn > $OUT/step_time_news_gpu.log
