#!/usr/bin/env bash
# `make demo`: prepare the Bible corpus, train the default Spanish->English model for a bounded
# time, score it with BLEU, translate a few sentences, then serve it with its web page.
# Run it again and it resumes where it stopped instead of starting over.
set -euo pipefail
MINUTES=${1:-20}
PORT=${2:-8000}
NMT=.venv/bin/nmt
PY=.venv/bin/python
CORPUS=data/bible-es-en
RUN=runs/bible-es-en

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/5 Preparing the Bible corpus (Reina-Valera 1909 / World English Bible)"
if [ -f "$CORPUS/manifest.json" ]; then
  echo "already prepared: $CORPUS"
else
  $PY data_scripts/bible.py --out "$CORPUS"
fi

step "2/5 Training configs/bible-es-en.yaml for up to $MINUTES minutes (DEMO_MINUTES=N to change)"
resume=()
if [ -d "$RUN/checkpoints" ] && ls "$RUN/checkpoints" | grep -q '^step-'; then
  echo "found checkpoints in $RUN: resuming"
  resume=(--resume)
fi
$NMT train --config configs/bible-es-en.yaml --run-dir "$RUN" \
  --set train.max_minutes="$MINUTES" "${resume[@]}"

step "3/5 Scoring on the test split (John + Proverbs), beam 5"
$NMT evaluate --model "$RUN/model" --src "$CORPUS/test.es" --ref "$CORPUS/test.en" \
  --beam-size 5 --output "$RUN/test.hyp.en" --bootstrap 200

step "4/5 Translating a few sentences"
examples="$RUN/demo-examples.es"
printf '%s\n' \
  "En el principio era el Verbo, y el Verbo era con Dios." \
  "Bienaventurados los pacificadores, porque ellos serán llamados hijos de Dios." \
  "El amor es sufrido, es benigno." > "$examples"
$NMT translate --model "$RUN/model" --input "$examples" --beam-size 5 | paste -d '\n' "$examples" - |
  sed 'n;s/^/  -> /'

step "5/5 Serving the model"
cat <<MSG
Web page:  http://127.0.0.1:$PORT/
API docs:  http://127.0.0.1:$PORT/docs
Try it:
  curl -s http://127.0.0.1:$PORT/v1/translate -H 'Content-Type: application/json' \\
       -d '{"text": ["Dios es amor."], "beam_size": 5}'
Press Ctrl+C to stop.
MSG
exec $NMT serve --model "$RUN/model" --host 127.0.0.1 --port "$PORT"
