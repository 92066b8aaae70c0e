#!/usr/bin/env bash
# One command for a GPU machine: writes $OUT/gpu_check.json and $OUT/gpu_check.md.
#
#   bash bench/gpu_check.sh            # CUDA, the default sections: at most 580 s (9 min 40 s), the sum of their limits
#   SECTIONS="warm_start inference_sd2_compiled" bash bench/gpu_check.sh   # compile: at most 570 s
#   SECTIONS="train_step_large" bash bench/gpu_check.sh                    # at most 180 s
#   SECTIONS="train_step_compiled" bash bench/gpu_check.sh                 # at most 480 s
#   SECTIONS="train_step_auto" bash bench/gpu_check.sh                     # at most 300 s
#   bash bench/gpu_check.sh --smoke    # every section but warm_start on the CPU with tiny presets (a test runs it)
#   SMOKE_WARM_START=1 bash bench/gpu_check.sh --smoke   # warm_start too (about 2 minutes more)
#
# OUT defaults to outputs/gpu_check; PYTHON to the project's .venv/bin/python where it exists, else python3.
# Sections, each under its own time limit, in this order:
#   inference_sd2           160 s  SD2-sized random weights, LR 128² -> SR 512², 1 and 4 steps: eager fp16 baseline,
#                                  ours eager / CUDA graph / graph + small PSR decoder, per-part breakdown, then the
#                                  2048² -> 8192² tiled run's peak (FLOPs: exact on the meta device, see the doc)
#   inference_seesr         110 s  the same rows at SeeSR size (image attention, Swin-L RAM), breakdown and FLOPs
#   degradation              20 s  batch 16 on CUDA vs its per-sample path
#   train_step              130 s  bench/train_step.py --preset seesr, ours at batch 2 against the plain baseline
#                                  (ours with method.speed's CUDA graphs, not compiled: see train_step_compiled)
#   ddp_scaling             240 s  machines with 2+ GPUs (skipped in a second otherwise): bench/ddp_scaling.py, ours at
#                                  batch 2 per GPU on 1 and on every GPU (trainer=ddp's strategy), the efficiency
#   gpu_tests                90 s  pytest -m gpu: the tests that need CUDA (CUDA graphs, the GPU degradation, ...),
#                                  each one's outcome in gpu_tests.json
#   graph_breaks             70 s  dynamo graph breaks of the tiny presets (CPU only; last, as it needs no GPU)
# Not in the default (SECTIONS names them):
#   warm_start              300 s  the compile cache across processes: a fresh process compiles ours (mode default per
#                                  module, under the CUDA graph; SD2 size, 4 steps) into an empty cache, a second one
#                                  loads it; each one's first call in seconds and torch's cache hit/miss counts
#   inference_sd2_compiled  270 s  eager fp16 and ours compiled (mode default) at 4 steps, SD2 size
#   train_step_large        180 s  ours at batch 4 and 8, no baseline
#   train_step_auto         300 s  the baseline, ours at batch 2, then ours method.memory.plan=auto at batch 6 (the
#                                  plan's probe, its choice and that run)
#   train_step_compiled     480 s  ours at batch 2 with method.speed's defaults on CUDA (compiled and graphed);
#                                  the compile time is printed apart from the iterations
# The limits come from the first run on an NVIDIA H200 (docs/gpu_runs/2026-11-30-h200/): degradation 10 s, graph
# breaks about 60 s (then the first section, cold imports included), SeeSR inference 109 s with one row more, the
# training bench about 160 s at batches 2 and 4 (building the models on the CPU is much of each), and the first
# call of ours compiled 135 s at SD2 size.
# inference_* rewrite their JSON after every row, so a section stopped by its limit keeps what it finished.
# Packages the machine lacks are installed offline from .wheelhouse/ (`make wheelhouse` fills it).
set -uo pipefail

SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then SMOKE=1; fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

declare -A LIMIT=(
  [inference_sd2]=160 [inference_seesr]=110 [degradation]=20 [train_step]=130 [graph_breaks]=70
  [gpu_tests]=90 [warm_start]=300 [inference_sd2_compiled]=270 [train_step_large]=180 [train_step_compiled]=480
  [ddp_scaling]=240 [train_step_auto]=300
)
DEFAULT_SECTIONS="inference_sd2 inference_seesr degradation train_step ddp_scaling gpu_tests graph_breaks"
SECTIONS="${SECTIONS:-$DEFAULT_SECTIONS}"
if [[ $SMOKE -eq 0 ]]; then
  for name in $SECTIONS; do
    if [[ -z "${LIMIT[$name]:-}" ]]; then
      echo "SECTIONS: unknown section '$name'; known: ${!LIMIT[*]}" >&2
      exit 2
    fi
  done
fi

OUT="${OUT:-outputs/gpu_check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
rm -f "$OUT"/{inference,inference_sd2,inference_sd2_compiled,inference_seesr,degradation,train_step,train_step_large,train_step_auto,train_step_compiled,ddp_scaling,graph_breaks,gpu_tests,warm_start,seconds}.json "$OUT"/*.partial
if [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; fi
PY="${PYTHON:-python3}"
echo "python: $PY"
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

GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
# each section's seconds and exit code, one file per section (a section run in the background writes its
# own), gathered into seconds.json at the end
SECONDS_DIR="$OUT/.seconds"
rm -rf "$SECONDS_DIR"
mkdir -p "$SECONDS_DIR"
FAILED=0
section() {  # section NAME LIMIT_S COMMAND...: run under a time limit, record its seconds and exit code
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@"
  local rc=$?
  echo "{\"seconds\": $((SECONDS - start)), \"rc\": $rc}" > "$SECONDS_DIR/$name"
  if [[ $rc -ne 0 ]]; then echo "section $name exited $rc" >&2; FAILED=1; fi
  return $rc
}

gpu_section() {  # gpu_section NAME: one section of the CUDA run, under LIMIT[NAME]
  local name="$1" limit="${LIMIT[$1]}"
  case "$name" in
    inference_sd2)
      section "$name" "$limit" "$PY" bench/inference.py --models sd2 \
        --rows eager_fp16,ours_eager,ours_graph,ours_graph_tiny_psr --no-flops --tiled-lr 2048 --tiled-steps 1 \
        --json "$OUT/$name.json" ;;
    inference_seesr)
      section "$name" "$limit" "$PY" bench/inference.py --models seesr \
        --rows eager_fp16,ours_eager,ours_graph,ours_graph_tiny_psr --json "$OUT/$name.json" ;;
    degradation)
      section "$name" "$limit" "$PY" bench/gpu_check.py degradation --device cuda --json "$OUT/$name.json" ;;
    train_step)
      [[ -f bench/train_step.py ]] && section "$name" "$limit" "$PY" bench/train_step.py --preset seesr \
        --batch 2 --memory-cap 20 --json "$OUT/$name.json" method.speed.compile=none ;;
    train_step_auto)
      [[ -f bench/train_step.py ]] && section "$name" "$limit" "$PY" bench/train_step.py --preset seesr \
        --batch 2 --memory-cap 20 --plan-auto --plan-batch 6 --json "$OUT/$name.json" method.speed.compile=none ;;
    train_step_compiled)
      [[ -f bench/train_step.py ]] && section "$name" "$limit" "$PY" bench/train_step.py --preset seesr \
        --batch 2 --memory-cap 20 --no-baseline --no-flops --json "$OUT/$name.json" ;;
    ddp_scaling)
      if (( GPUS < 2 )); then
        echo "== $name: $GPUS GPU(s), scaling needs at least 2: skipped"
        echo "{\"skipped\": \"$GPUS GPU(s): scaling needs at least 2\"}" > "$OUT/$name.json"
      else
        section "$name" "$limit" "$PY" bench/ddp_scaling.py --preset seesr --devices "$GPUS" --batch 2 \
          --json "$OUT/$name.json" method.speed.compile=none
      fi ;;
    graph_breaks)
      section "$name" "$limit" "$PY" bench/gpu_check.py graph-breaks --json "$OUT/$name.json" ;;
    gpu_tests)
      section "$name" "$limit" "$PY" bench/gpu_check.py gpu-tests --json "$OUT/$name.json" ;;
    warm_start)
      section "$name" "$limit" "$PY" bench/gpu_check.py warm-start --device cuda --json "$OUT/$name.json" ;;
    inference_sd2_compiled)
      section "$name" "$limit" "$PY" bench/inference.py --models sd2 --rows eager_fp16,ours_compiled \
        --steps 4 --compile-mode default --no-flops --json "$OUT/$name.json" ;;
    train_step_large)
      [[ -f bench/train_step.py ]] && section "$name" "$limit" "$PY" bench/train_step.py --preset seesr \
        --batch 4,8 --no-baseline --memory-cap 20 --json "$OUT/$name.json" ;;
  esac
}

if command -v nvidia-smi >/dev/null; then nvidia-smi | tee "$OUT/nvidia-smi.txt"; else echo "no nvidia-smi" | tee "$OUT/nvidia-smi.txt"; fi

if [[ $SMOKE -eq 1 ]]; then
  # Generous limits: the smoke run proves the script works (about 5 minutes on 2 idle cores; 2 more with the
  # warm start), a shared CPU can be several times slower.
  echo "smoke run: at most 3000 s (the sum of the section limits)"
  # graph_breaks needs nothing the others write: it runs meanwhile (one thread, its own cache folder for the
  # tiny tokenizer), on a second core where there is one (tracing is single-threaded Python); its output
  # follows the others'
  section graph_breaks 600 env OMP_NUM_THREADS=1 "$PY" bench/gpu_check.py graph-breaks --presets tiny_seesr \
    --cache-dir "$OUT/.graph_breaks_cache" --json "$OUT/graph_breaks.json" > "$OUT/graph_breaks.log" 2>&1 &
  graph_breaks_pid=$!
  section inference 600 "$PY" bench/inference.py --tiny --models tiny_seesr \
    --rows eager_fp16,eager_bf16,ours_eager,ours_graph_tiny_psr --steps 1,2 --tiled-lr 16 --tiled-tile 4 \
    --json "$OUT/inference_seesr.json"
  section degradation 300 "$PY" bench/gpu_check.py degradation --smoke --device cpu --json "$OUT/degradation.json"
  if [[ -f bench/train_step.py ]]; then
    section train_step 600 "$PY" bench/train_step.py --tiny --json "$OUT/train_step.json"
  fi
  section ddp_scaling 300 "$PY" bench/ddp_scaling.py --tiny --devices 2 --warmup 0 --iters 1 --json "$OUT/ddp_scaling.json"
  section gpu_tests 300 "$PY" bench/gpu_check.py gpu-tests --json "$OUT/gpu_tests.json"
  # two tiny compiles from an empty cache and one from the full one: minutes on a CPU, so only when asked
  # (SMOKE_WARM_START=1); tests/test_compile_cache.py runs the same across two processes of the CLI
  if [[ "${SMOKE_WARM_START:-0}" == 1 ]]; then
    section warm_start 600 "$PY" bench/gpu_check.py warm-start --smoke --device cpu --json "$OUT/warm_start.json"
  fi
  wait "$graph_breaks_pid" || FAILED=1
  cat "$OUT/graph_breaks.log"
else
  total=0
  for name in $SECTIONS; do
    if [[ $name == ddp_scaling ]] && (( GPUS < 2 )); then continue; fi  # skipped at once
    total=$((total + LIMIT[$name]))
  done
  echo "sections: $SECTIONS; at most ${total} s (the sum of their limits)"
  for name in $SECTIONS; do gpu_section "$name"; done
fi

# inference: {"sd2": ..., "seesr": ...} from the runs that wrote their JSON (complete or not)
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
  for file in "$SECONDS_DIR"/*; do
    [[ -f "$file" ]] || continue
    [[ $first -eq 1 ]] || echo ","
    first=0
    echo "\"$(basename "$file")\": $(cat "$file")"
  done
  echo "}"
} > "$OUT/seconds.json"
"$PY" bench/gpu_check.py merge "$OUT" || exit 1
echo "wrote $OUT/gpu_check.json and $OUT/gpu_check.md"
exit $FAILED
