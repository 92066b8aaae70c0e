#!/usr/bin/env bash
# One command for a GPU machine (about 9 minutes at most): writes $OUT/gpu_check.json and $OUT/gpu_check.md.
#
#   bash bench/gpu_check.sh            # CUDA: SD2- and SeeSR-sized random weights, 512² and an 8192² tiled run
#   bash bench/gpu_check.sh --smoke    # the same sections on the CPU with tiny presets (a test runs it)
#
# OUT defaults to outputs/gpu_check. Sections: nvidia-smi; inference (1 and 4 steps, ours vs the eager
# fp16/bf16 baselines in the same process, per-part breakdown, FLOPs, compile/capture time, the tiled
# run's peak); the degradation batched vs per sample; bench/train_step.py when present; graph breaks.
# Packages the machine lacks are installed offline from .wheelhouse/ (`make wheelhouse` fills it).
set -uo pipefail

SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then SMOKE=1; fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-outputs/gpu_check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
rm -f "$OUT"/{inference,inference_sd2,inference_seesr,degradation,train_step,graph_breaks,seconds}.json
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1

# Offline install of what the machine lacks (diffusers, hydra-core, omegaconf, kornia, ...).
if ! "$PY" -c "import diffusers, hydra, omegaconf, kornia" 2>/dev/null; then
  if [[ ! -d .wheelhouse ]]; then
    echo "Missing packages and no .wheelhouse/: run 'make wheelhouse' where a registry is reachable" >&2
    exit 2
  fi
  SITE="${TMPDIR:-/tmp}/addsr_pl_site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .wheelhouse/*.whl || exit 2
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi

declare -A SECONDS_OF
FAILED=0
section() {  # section NAME LIMIT_S COMMAND...: run under a time limit, record its seconds and exit code
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@"
  local rc=$?
  SECONDS_OF[$name]="{\"seconds\": $((SECONDS - start)), \"rc\": $rc}"
  if [[ $rc -ne 0 ]]; then echo "section $name exited $rc" >&2; FAILED=1; fi
}

if command -v nvidia-smi >/dev/null; then nvidia-smi | tee "$OUT/nvidia-smi.txt"; else echo "no nvidia-smi" | tee "$OUT/nvidia-smi.txt"; fi

if [[ $SMOKE -eq 1 ]]; then
  # Generous limits: the smoke run proves the script works (about 4 minutes on 2 idle cores), a shared
  # CPU can be several times slower; the GPU run's limits below are what keeps it within 9 minutes.
  section graph_breaks 600 "$PY" bench/gpu_check.py graph-breaks --presets tiny_seesr --json "$OUT/graph_breaks.json"
  section inference 600 "$PY" bench/inference.py --tiny --models tiny_seesr \
    --rows eager_fp16,eager_bf16,ours_eager,ours_graph_tiny_psr --steps 1,2 --tiled-lr 16 --tiled-tile 4 \
    --json "$OUT/inference_seesr.json"
  section degradation 300 "$PY" bench/gpu_check.py degradation --smoke --device cpu --json "$OUT/degradation.json"
  if [[ -f bench/train_step.py ]]; then
    section train_step 600 "$PY" bench/train_step.py --tiny --json "$OUT/train_step.json"
  fi
else
  section graph_breaks 60 "$PY" bench/gpu_check.py graph-breaks --json "$OUT/graph_breaks.json"
  section inference_sd2 240 "$PY" bench/inference.py --models sd2 --compile-mode default \
    --tiled-lr 2048 --tiled-steps 1 --json "$OUT/inference_sd2.json"
  section inference_seesr 120 "$PY" bench/inference.py --models seesr \
    --rows eager_fp16,eager_bf16,ours_eager,ours_graph,ours_graph_tiny_psr --json "$OUT/inference_seesr.json"
  section degradation 30 "$PY" bench/gpu_check.py degradation --device cuda --json "$OUT/degradation.json"
  if [[ -f bench/train_step.py ]]; then
    section train_step 90 "$PY" bench/train_step.py --preset seesr --batch 2,4,8 --memory-cap 20 \
      --json "$OUT/train_step.json"
  fi
fi

# inference: {"sd2": ..., "seesr": ...} from the runs that finished
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {p.stem.removeprefix("inference_"): json.loads(p.read_text()) for p in sorted(out.glob("inference_*.json"))}
(out / "inference.json").write_text(json.dumps(runs, indent=2))
PYEOF
{
  echo "{"
  first=1
  for name in "${!SECONDS_OF[@]}"; do
    [[ $first -eq 1 ]] || echo ","
    first=0
    echo "\"$name\": ${SECONDS_OF[$name]}"
  done
  echo "}"
} > "$OUT/seconds.json"
"$PY" bench/gpu_check.py merge "$OUT" || exit 1
echo "wrote $OUT/gpu_check.json and $OUT/gpu_check.md"
exit $FAILED
