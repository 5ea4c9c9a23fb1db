#!/usr/bin/env bash
# The paper's MNIST class-removal protocol, one command (meant for a GPU):
# for each removed class, NP, SLD and DNG over wide grids of guidance scales,
# 10,240 samples per grid point on the full T = 1000 chain (config mnist.py:full),
# then one report (report.md, tradeoff_all.png) over all classes.
#
#   bash sample/run_protocol.sh                       # classes 0-3 (the shipped forget models)
#   CLASSES="0" CONFIG=sample/configs/mnist.py:report bash sample/run_protocol.sh   # smaller
#   bash sample/run_protocol.sh --config.n=2048       # extra flags go to every sample/main.py run
#
#   CONFIG=sample/configs/mnist.py:protocol SETUPS="forget cond" OUT=outputs/protocol_cpu bash sample/run_protocol.sh
#                                                     # the CPU second pass: both setups, resumable
#   export CONFIG=sample/configs/mnist.py:protocol OUT=outputs/protocol_cpu
#   CORE=0 SETUPS=cond bash sample/run_protocol.sh & CORE=1 SETUPS=forget bash sample/run_protocol.sh &
#                                                     # two lanes, one pinned single-threaded process per
#                                                     # core: 1.6x the throughput of one process on both;
#                                                     # the deciding points are topped up to n = 1024
#   export CONFIG=sample/configs/mnist.py:select OUT=outputs/select
#   CORE=0 CLASSES="0 1" bash sample/run_protocol.sh & CORE=1 CLASSES="2 3" bash sample/run_protocol.sh &
#   python sample/main.py --job=select --runs=outputs/select      # DNG's settings on selection seeds, then the rule
#
# Environment: CLASSES (default "0 1 2 3"), CONFIG (default sample/configs/mnist.py:full),
# SETUPS (default "forget": the unconditional + forget-class models; "cond": one class-conditional
# model, eps(x | null) and eps(x | c-)), OUT (default outputs/protocol/<UTC time>; give a fixed OUT
# to resume: finished grid points are never recomputed, also when a rerun adds methods or scales; a
# folder of another config or other model files is refused, see --config.overwrite),
# PYTHON (default python), CORE (pin every run to this CPU core, XLA single-threaded; unset: all cores),
# EXTEND (after each class, top up the points that decide the verdict to this many samples on new seeds,
# dngjax/tools/sample/extend.py; the report merges them; default: 1024 for the protocol config, none otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
CLASSES=${CLASSES:-"0 1 2 3"}
CONFIG=${CONFIG:-sample/configs/mnist.py:full}
OUT=${OUT:-outputs/protocol/$(date -u +%Y%m%d-%H%M%S)}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
echo "protocol: config $CONFIG, classes $CLASSES -> $OUT"
"$PYTHON" -c "import jax; print('devices:', jax.devices())" | tee "$OUT/devices.txt"
SETUPS=${SETUPS:-forget}
case $CONFIG in *:protocol) EXTEND=${EXTEND-1024} ;; *) EXTEND=${EXTEND-} ;; esac
PIN=()
if [ -n "${CORE:-}" ]; then
  PIN=(taskset -c "$CORE")
  export XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1 ${XLA_FLAGS:-}"
fi
for setup in $SETUPS; do
  case $setup in
    forget) extra=(); dir="$OUT" ;;
    cond) extra=(--config.conditional='{root}/cond'); dir="$OUT/conditional" ;;
    *) echo "unknown setup $setup (forget or cond)" >&2; exit 2 ;;
  esac
  mkdir -p "$dir"
  for c in $CLASSES; do
    start=$(date +%s)
    "${PIN[@]}" "$PYTHON" sample/main.py --config="$CONFIG" --config.removed_class="$c" \
        --config.outdir="$dir/class_$c" "${extra[@]}" "$@" 2>&1 | tee -a "$dir/class_$c.log"
    if [ -n "$EXTEND" ]; then   # the points that decide the verdict, topped up to $EXTEND samples
      "${PIN[@]}" "$PYTHON" sample/main.py --job=extend --runs="$dir/class_$c" --n="$EXTEND" 2>&1 | tee -a "$dir/class_$c.log"
    fi
    echo "$setup class $c: $(( $(date +%s) - start )) s" | tee -a "$OUT/timings.txt"
  done
  "$PYTHON" sample/main.py --job=report --runs="$dir"
done
