#!/usr/bin/env bash
# Caption generation on one GPU, offline: a 2B-class and a 7B-class VLM built from their configs with random
# weights, exactly 512 new tokens per image; images/s and output tokens/s of the transformers engine at batch
# sizes 1, 8 and 32, and of the openai engine against vLLM and SGLang where they are installed.  One JSON file
# of results (default gpu_caption_results.json).  Prepared to finish in under 8 minutes on an H100 / H200.
#
#   bash benchmarks/gpu_caption.sh [RESULTS.json]
#
# On a machine without a GPU it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
output=${1:-gpu_caption_results.json}
python=${PYTHON:-python3}

if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_caption.sh: no GPU here (torch sees no CUDA device); nothing was measured."
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true

# Nothing is downloaded: the models are built from configs, the servers load dummy weights.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# 450 s of measurements, and a hard stop at 7.5 minutes; results are saved after each measurement.
timeout 450 "$python" benchmarks/gpu_caption.py --output "$output" --budget 420 || status=$?
if [ "${status:-0}" -ne 0 ]; then
    echo "gpu_caption.py stopped with status ${status}; the results measured so far are in $output"
fi
