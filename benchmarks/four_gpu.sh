#!/bin/bash
# The multi-GPU figures of RESULTS.md on one host of four GPUs, in three parts of under ten
# minutes each. Runs that need fewer cards go side by side on disjoint cards (lanes); runs
# that need all four go after them. Llama-3-8B with dummy bf16 weights throughout.
#
#   TOKENIZER=path/to/smollm2-tokenizer OUT=results-dir bash benchmarks/four_gpu.sh engine
#   OUT=results-dir bash benchmarks/four_gpu.sh serving
#   OUT=results-dir bash benchmarks/four_gpu.sh tp4
#
# engine:  card 0: the extend kernel's block sweep, then constrained output with and without
#                  jump-forward;
#          card 1: bench_one_batch at TP 1 (batch 1 and 128), then batch 1 with the layer loop
#                  in one CUDA graph;
#          cards 2, 3: the engine's decode step at TP 1 and TP 2, one and eight steps a launch;
#          then cards 0, 1: greedy parity of both attention backends at TP 1 and TP 2.
# serving: the multi-turn scenario of benchmarks/serving_scenarios.md, all with the radix cache
#          but the first: TP 1 without it (card 0); TP 1, then the random 512/256 scenario
#          (card 1); the GPU's ceilings, TP 2, then DP 2 (cards 2, 3).
# tp4:     the multi-turn scenario at TP 4 and DP 4 with the radix cache, bench_one_batch at
#          TP 4, and the table of every serving run against TP 1 without the radix cache.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-benchmarks/results/$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-')-$(date +%F)}
mkdir -p "$OUT"
# MODEL_ARGS, MT_SESSIONS and SERVER_ARGS (added to every server's flags) shrink the runs for
# a dry run on the CPU.
read -r -a MODEL <<< "${MODEL_ARGS:---model-path llama-3-8b --load-format dummy --dtype bfloat16}"

run() {  # name, seconds, cards, command...
    local name=$1 limit=$2 cards=$3
    shift 3
    local t0=$SECONDS
    CUDA_VISIBLE_DEVICES=$cards timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name (cards $cards): exit $?, $((SECONDS - t0)) s"
}

engine() {
    (
        run kernels_extend 150 0 python benchmarks/kernel_bench.py --only extend \
            --out "$OUT/kernels_extend.json"
        run jump_forward 200 0 python benchmarks/jump_forward.py "${MODEL[@]}" \
            --tokenizer-path "${TOKENIZER:?set TOKENIZER to a tokenizer folder}" --num-prompts 64
    ) &
    local card0=$!
    (
        run one_batch_tp1 150 1 python -m jaxsgl.bench_one_batch "${MODEL[@]}" \
            --batch-size 1 128 --input-len 1024 --output-len 16 \
            --num-continuous-decode-steps 8 --result-file "$OUT/one_batch.jsonl"
        # The whole layer loop as one CUDA graph (XLA's command buffers take while loops
        # only when asked), kept as a loop and unrolled into the graph.
        local graphs=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL
        XLA_FLAGS="--xla_gpu_enable_command_buffer=$graphs" run one_batch_graph_loop 120 1 \
            python -m jaxsgl.bench_one_batch "${MODEL[@]}" --batch-size 1 --input-len 1024 \
            --output-len 16 --num-continuous-decode-steps 8 --result-file "$OUT/one_batch_graph.jsonl"
        XLA_FLAGS="--xla_gpu_enable_command_buffer=$graphs --xla_gpu_command_buffer_unroll_loops=true" \
            run one_batch_graph_unrolled 120 1 python -m jaxsgl.bench_one_batch "${MODEL[@]}" \
            --batch-size 1 --input-len 1024 --output-len 16 --num-continuous-decode-steps 8 \
            --result-file "$OUT/one_batch_graph.jsonl"
    ) &
    local card1=$!
    run overlap_gap_tp 400 2,3 python benchmarks/overlap_gap.py --model-path llama-3-8b \
        --tp-size 1 2 --batch-size 1 128 --input-len 1024 --output-len 64 --overlap on \
        --decode-steps 1 8 --out "$OUT/overlap_gap_tp.json" &
    wait $card0 $card1
    run backend_parity 200 0,1 python benchmarks/backend_parity.py --backends native pallas \
        --tp-sizes 1 2 --model-path benchmarks/configs/tiny-gqa4 \
        --expect benchmarks/backend_parity_tiny_cpu.json --out "$OUT/parity.json"
    wait
    for f in "$OUT"/*.log; do echo "--- $f"; tail -n 6 "$f"; done
}

MT=(--dataset-name multi-turn --mt-num-sessions "${MT_SESSIONS:-256}" --mt-turns 5 --mt-turn-len 512
    --mt-output-len 256 --max-concurrency 256 --warmup-requests 8 --flush-cache --seed 1)

serve() {  # label, cards, port, seconds, "server flags", bench flags...
    local label=$1 cards=$2 port=$3 limit=$4 flags=$5
    shift 5
    local t0=$SECONDS
    # shellcheck disable=SC2086 # the server flags are words
    CUDA_VISIBLE_DEVICES=$cards python -m jaxsgl.launch_server "${MODEL[@]}" \
        --host 127.0.0.1 --port "$port" --max-running-requests 256 --log-level warning \
        $flags ${SERVER_ARGS:-} > "$OUT/$label.server.log" 2>&1 &
    local server=$!
    until curl -sf "localhost:$port/health" > /dev/null; do
        if ! kill -0 "$server" 2> /dev/null || ((SECONDS - t0 > limit)); then
            echo "== $label: the server did not come up"
            kill "$server" 2> /dev/null
            return
        fi
        sleep 2
    done
    local up=$((SECONDS - t0))
    timeout $((limit - up)) python -m jaxsgl.bench_serving --backend jaxsgl --port "$port" \
        --label "$label" --output-file "$OUT/$label.json" "$@" > "$OUT/$label.log" 2>&1
    echo "== $label (cards $cards): exit $?, server up in $up s, $((SECONDS - t0)) s in all"
    kill "$server"
    wait "$server" 2> /dev/null
}

serving() {
    serve mt-tp1-noradix 0 30000 420 "--context-length 4096 --disable-radix-cache" "${MT[@]}" &
    (
        serve mt-tp1-radix 1 30001 240 "--context-length 4096" "${MT[@]}"
        serve random-tp1 1 30001 200 "--context-length 1024" --dataset-name random \
            --random-input-len 512 --random-output-len 256 --num-prompts 1000 \
            --max-concurrency 256 --warmup-requests 8 --flush-cache --seed 1 \
            --roofline-model llama-3-8b --ceilings "$OUT/ceilings.json"
    ) &
    (
        CUDA_VISIBLE_DEVICES=2 python -m jaxsgl.roofline --out "$OUT/ceilings.json" \
            > "$OUT/ceilings.log" 2>&1
        serve mt-tp2-radix 2,3 30002 200 "--context-length 4096 --tp-size 2" "${MT[@]}"
        serve mt-dp2-radix 2,3 30002 200 "--context-length 4096 --dp-size 2" "${MT[@]}"
    ) &
    wait
}

tp4() {
    serve mt-tp4-radix 0,1,2,3 30000 200 "--context-length 4096 --tp-size 4" "${MT[@]}"
    serve mt-dp4-radix 0,1,2,3 30000 200 "--context-length 4096 --dp-size 4" "${MT[@]}"
    run one_batch_tp4 180 0,1,2,3 python -m jaxsgl.bench_one_batch "${MODEL[@]}" \
        --tp-size 4 --batch-size 1 128 --input-len 1024 --output-len 16 \
        --result-file "$OUT/one_batch.jsonl"
    tail -n 12 "$OUT/one_batch_tp4.log"
    python benchmarks/serving_table.py "$OUT"/mt-*.json "$OUT"/random-tp1.json \
        --baseline "$OUT/mt-tp1-noradix.json"
}

"${1:?engine, serving or tp4}"
