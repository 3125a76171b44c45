#!/usr/bin/env bash
# On a machine with a CUDA GPU: every tests/gpu case (each compares a CUDA path with the CPU fp32 result), then the
# GPU benchmarks, in under 10 minutes. Writes the benchmark JSON/PNG under $OUT (default ./gpu-results), never over
# docs/ (copy figures there by hand once they are checked).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
bash scripts/setup.sh
nvidia-smi -L
.venv/bin/python -m pytest -q -m gpu tests/gpu
.venv/bin/python bench/moe_layer.py --device cuda --dtype bfloat16 --tokens 16384 \
    --out-json "$out/bench_moe_layer_gpu.json" --out-png "$out/bench_moe_layer_gpu.png"
.venv/bin/python bench/memory.py --device cuda --dim 1024 --layers 16 --seq 2048 \
    --out-json "$out/bench_memory_gpu.json" --out-png "$out/bench_memory_gpu.png"
.venv/bin/python bench/lora.py --device cuda --dim 1024 --layers 8 --seq 1024 \
    --out-json "$out/bench_lora_gpu.json" --out-png "$out/bench_lora_gpu.png"
# The serving engine on the GPU: float32, bfloat16 and int8 decode tokens/s against the HBM-bandwidth ceiling.
.venv/bin/python bench/quant.py --device cuda --threads 8 --steps 150 \
    --out-json "$out/bench_quant_gpu.json" --out-png "$out/bench_quant_gpu.png"
