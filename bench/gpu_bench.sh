#!/usr/bin/env bash
# One-shot GPU benchmark for issue 5 (docs/performance.md): a Llama-2-7B-shaped LLM (random
# weights, bf16) + the feature-size-48 U-Net, 384 x 384 x 128 windows, on one GPU.
#
# Measures, in one run and on the same card:
#   1. mmcontour bench --preset gpu-7b --offload-modes: model load, note encoding, windows, time per
#      window, end to end (new CT + new note), edited note (same CT), peak GPU memory with the LLM
#      resident and with it moved off after encoding, multimodal / vision-only window ratio, the
#      reference-style loop (LLM once per window, fp32, no caching) and a training step
#      (batch 2 of 384 x 384 x 128, prompt tuning through the frozen LLM, activation checkpointing).
#   2. the same contouring with torch.compile (only if time is left; BENCH_COMPILE=0 skips it).
#   3. note encoding + contouring with the LLM in 8 bits (bitsandbytes; if carried and time is left;
#      BENCH_INT8=0 skips it).
# Everything lands in $OUT (gpu-7b.json, logs, nvidia-smi.txt). Installs nothing from a network.
#
# The GPU machine has PyTorch, transformers, safetensors, psutil, tqdm but neither MONAI nor
# SimpleITK: carry them as wheels (Python 3.12 there). Once, on the development machine:
#   echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl monai==1.6.1 SimpleITK==2.5.3 bitsandbytes==0.50.2   # ~97 MB together
# then run with the device tool: command "bash bench/gpu_bench.sh", carry [".whl"], timeout_s 590.
# Expected duration on one H100: ~1 min to write the random 7B model, ~4 min of measurements.
# (BENCH_PRESET=tiny runs the same script on a CPU in seconds, to check it.)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MMCONTOUR_CACHE=${MMCONTOUR_CACHE:-/tmp/mmcontour}
START=$(date +%s)

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed" | tee "$OUT/error.txt"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python3 - > "$OUT/versions.txt" 2>&1 <<'EOF'
import platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__)
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("monai", "SimpleITK", "bitsandbytes"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", None) or module.Version_VersionString())
    except Exception as exc:  # noqa: BLE001 - report whatever is missing
        print(name, "missing:", exc)
EOF
cat "$OUT/versions.txt"

left() { echo $(( ${1} - ($(date +%s) - START) )); }

# 1. the whole benchmark (the random 7B folder is written first, ~13.5 GB under $MMCONTOUR_CACHE)
timeout "$(left 470)" python3 -m MMContourLib.bench bench --preset "${BENCH_PRESET:-gpu-7b}" --offload-modes --json \
  --out "$OUT/gpu-7b.json" --work "$MMCONTOUR_CACHE/bench" > "$OUT/gpu-7b.stdout" 2> "$OUT/gpu-7b.log"
echo "gpu-7b: exit $? after $(( $(date +%s) - START )) s"
tail -n 30 "$OUT/gpu-7b.log"

# 2. torch.compile, contouring only, if at least ~2.5 minutes are left of the 9.5 allowed
if [ "${BENCH_COMPILE:-1}" = 1 ] && [ "$(left 570)" -gt 150 ]; then
  timeout "$(left 570)" python3 -m MMContourLib.bench bench --preset "${BENCH_PRESET:-gpu-7b}" --compile --only contour --repeats 2 \
    --json --out "$OUT/gpu-7b-compile.json" --work "$MMCONTOUR_CACHE/bench" \
    > "$OUT/gpu-7b-compile.stdout" 2> "$OUT/gpu-7b-compile.log"
  echo "gpu-7b --compile: exit $? after $(( $(date +%s) - START )) s"
  tail -n 10 "$OUT/gpu-7b-compile.log"
fi
# 3. the LLM in 8 bits (LLM.int8 through bitsandbytes), contouring only, if ~2 minutes are left
if [ "${BENCH_INT8:-1}" = 1 ] && grep -q "^bitsandbytes [0-9]" "$OUT/versions.txt" && [ "$(left 570)" -gt 120 ]; then
  timeout "$(left 570)" python3 -m MMContourLib.bench bench --preset "${BENCH_PRESET:-gpu-7b}" --llm-dtype int8 \
    --only encode contour --repeats 2 --json --out "$OUT/gpu-7b-int8.json" --work "$MMCONTOUR_CACHE/bench" \
    > "$OUT/gpu-7b-int8.stdout" 2> "$OUT/gpu-7b-int8.log"
  echo "gpu-7b --llm-dtype int8: exit $? after $(( $(date +%s) - START )) s"
  tail -n 10 "$OUT/gpu-7b-int8.log"
fi
python3 - "$OUT" <<'EOF'
import json, sys, pathlib
for f in sorted(pathlib.Path(sys.argv[1]).glob("gpu-7b*.json")):
    print(f.name, json.dumps(json.loads(f.read_text())["summary"], indent=1))
EOF
