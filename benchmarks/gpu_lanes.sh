#!/bin/bash
# The multi-GPU figures of RESULTS.md, in parts of under ten minutes each. Runs that need
# fewer cards go side by side on disjoint cards (lanes); runs that need them all go after.
# Llama-3-8B with dummy bf16 weights throughout.
#
#   OUT=results-dir bash benchmarks/gpu_lanes.sh PART
#
# Two cards (one host):
#   serving-1  card 0: the multi-turn scenario of benchmarks/serving_scenarios.md at TP 1
#              without the radix cache; card 1: the GPU's ceilings, the multi-turn scenario at
#              TP 1 with the radix cache, then the random 512/256 scenario.
#   engine     card 0: the engine's decode step at TP 1 (batch 1 and 128, eight steps a
#              launch), then bench_one_batch at batch 1 without and with the layer loop in
#              one CUDA graph; card 1: constrained output with and without jump-forward
#              (TOKENIZER= a tokenizer folder); then both: the decode step at TP 2.
#   serving-2  the multi-turn scenario at TP 2 and at DP 2 with the radix cache, greedy parity
#              of TP 1 and TP 2, and the table of every serving run against TP 1 without the
#              radix cache.
#   two-mt1    the multi-turn scenario at TP 1 without and with the radix cache, side by side.
#   two-mt2    the same at TP 2 with the radix cache, and the table against two-mt1's rows
#              (same OUT).
#   two-mt-profile  two-mt2's run with a JAX trace of 40 engine steps mid-run (/start_profile),
#              summed by kernel kind (trace_summary.py).
#   kv8        bench_one_batch with the model's KV type and with --kv-cache-dtype fp8_e4m3.
#   kernels8   one card: the attention kernels over an 8-bit pool, decode's block sweep too.
# Four cards (one host), every row of the deployment table on one machine:
#   four-1     lanes: the GPU's ceilings, TP 1 without the radix cache, then the random
#              512/256 scenario; TP 1 with it, then bench_one_batch at TP 1; TP 2 with it.
#   four-2     TP 4 with the radix cache, then bench_one_batch at TP 4.
#   four-3     DP 4 with the radix cache (MT_LIMIT: its time limit, start included).
#   four-3r    DP 4 as four one-card servers behind jaxsgl.router (cache-aware), started one
#              then three so the three load the first one's compiled programs.
#   four-4r    DP 2 x TP 2: two servers of two cards each behind jaxsgl.router.
#   tp4-profile  bench_one_batch at TP 4 (batch 1 and 128, eight steps a launch) with a trace of
#              its decode launches, then the same at TP 1 on card 0; each trace summed by kernel
#              kind.
#   tp4-variants  bench_one_batch at TP 4 (batch 1 and 128, eight steps a launch) as it is, with
#              XLA's one-shot all-reduce, with the layer loop and its collectives in CUDA graphs,
#              and with the layers unrolled.
#   tp4-launch  bench_one_batch at TP 4 (batch 1 and 128, eight steps a launch) without XLA's
#              command buffers, with synchronous collectives, and both; then a trace at batch 1.
#   tp4-nccl   bench_one_batch at TP 4 with NCCL's all-reduces in place of XLA's Triton kernel,
#              then also with the layer loop, its collectives included, in CUDA graphs; the
#              all-reduce chain alone under both.
#   allreduce  how the cards are linked, then a decode step's chain of 64 all-reduces alone at
#              TP 2 and 4 (allreduce_bench.py), under XLA's and NCCL's ways of all-reducing.
#   four-mt    the multi-turn rows alone (TP 1 without and with radix, TP 2, TP 4), e.g. to
#              compare SERVER_ARGS; MT_LIMIT sets the first three's time limit, MT_TP4=0
#              leaves TP 4 out.
#   hopper     one card: bfloat16 greedy parity of native and both extend kernels; prefill
#              with each extend kernel.
#   probe      lanes: the extend kernels' ragged checks and sweep (card 0); greedy parity of
#              both backends at TP 1 and TP 2 (cards 2,3; a stack dump if it runs out of time).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# XLA's pool takes 0.92 of each card unless set; the rest holds CUDA's own buffers and NCCL's.
# On cards under 100 GB a tensor-parallel server's pool takes 0.87 (TP_MEM_FRACTION): 0.08 of
# an 80 GB card is too little for NCCL (see jaxsgl/engine/sizing.py).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
CARD_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2> /dev/null | head -1)
if ((${CARD_MIB:-0} < 100000)); then
    TP_MEM_FRACTION=${TP_MEM_FRACTION:-0.87}
else
    TP_MEM_FRACTION=${TP_MEM_FRACTION:-$XLA_PYTHON_CLIENT_MEM_FRACTION}
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-benchmarks/results/$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-')-$(date +%F)}
mkdir -p "$OUT"
# SERVER_ARGS is added to every server's flags (e.g. "--num-continuous-decode-steps 8");
# MODEL_ARGS and MT_SESSIONS shrink the runs for a dry run on the CPU; MT_USERS, below.
read -r -a MODEL <<< "${MODEL_ARGS:---model-path llama-3-8b --load-format dummy --dtype bfloat16}"
# XLA's command buffers with the layer loop in them (they take while loops only when asked).
GRAPHS=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL
# The TP 4 decode step as the tp4-* lanes time it.
TP4_STEP=(python -m jaxsgl.bench_one_batch "${MODEL[@]}" --tp-size 4 --batch-size 1 128
    --input-len 1024 --output-len 16 --num-continuous-decode-steps 8)

run() {  # name, seconds, cards, command...
    local name=$1 limit=$2 cards=$3
    shift 3
    local t0=$SECONDS
    CUDA_VISIBLE_DEVICES=$cards timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name (cards $cards): exit $rc, $((SECONDS - t0)) s"
    return $rc
}

engine() {
    : "${TOKENIZER:?set TOKENIZER to a tokenizer folder}"
    (
        run overlap_gap_tp1 200 0 python benchmarks/overlap_gap.py --model-path llama-3-8b \
            --batch-size 1 128 --input-len 1024 --output-len 64 --overlap on \
            --decode-steps 8 --out "$OUT/overlap_gap_tp1.json"
        # Batch 1 as it is, then with the whole layer loop in one CUDA graph (XLA's command
        # buffers take while loops only when asked).
        local bs1=(--batch-size 1 --input-len 1024 --output-len 16 --num-continuous-decode-steps 8)
        run one_batch_bs1 100 0 python -m jaxsgl.bench_one_batch "${MODEL[@]}" "${bs1[@]}" \
            --result-file "$OUT/one_batch.jsonl"
        XLA_FLAGS="--xla_gpu_enable_command_buffer=$GRAPHS" run one_batch_bs1_graph 100 0 \
            python -m jaxsgl.bench_one_batch "${MODEL[@]}" "${bs1[@]}" \
            --result-file "$OUT/one_batch_graph.jsonl"
    ) &
    run jump_forward 220 1 python benchmarks/jump_forward.py "${MODEL[@]}" \
        --tokenizer-path "$TOKENIZER" --num-prompts 64 &
    wait
    run overlap_gap_tp2 150 0,1 python benchmarks/overlap_gap.py --model-path llama-3-8b \
        --tp-size 2 --batch-size 128 --input-len 1024 --output-len 64 --overlap on \
        --decode-steps 8 --out "$OUT/overlap_gap_tp2.json"
    for f in "$OUT"/*.log; do echo "--- $f"; tail -n 6 "$f"; done
}

# MT_USERS: sessions in flight at once (the client's concurrency and the server's running
# requests; the deployment guide's claim is for 512).
USERS=${MT_USERS:-256}
MT=(--dataset-name multi-turn --mt-num-sessions "${MT_SESSIONS:-$USERS}" --mt-turns 5 --mt-turn-len 512
    --mt-output-len 256 --max-concurrency "$USERS" --warmup-requests 8 --flush-cache --seed 1)

launch() {  # label, cards, port, "server flags": a server in the background, its pid in SERVER_PID
    local label=$1 cards=$2 port=$3 flags=$4 fraction=$XLA_PYTHON_CLIENT_MEM_FRACTION
    [[ $flags == *--tp-size* ]] && fraction=$TP_MEM_FRACTION
    # shellcheck disable=SC2086 # the server flags are words
    XLA_PYTHON_CLIENT_MEM_FRACTION=$fraction CUDA_VISIBLE_DEVICES=$cards python -m jaxsgl.launch_server "${MODEL[@]}" \
        --host 127.0.0.1 --port "$port" --max-running-requests "$USERS" --log-level warning \
        $flags ${SERVER_ARGS:-} > "$OUT/$label.server.log" 2>&1 &
    SERVER_PID=$!
}

wait_up() {  # port, pid, start time, seconds: 0 once /health answers, 1 if the process ends first or time runs out
    until curl -sf --max-time 5 "localhost:$1/health" > /dev/null; do
        if ! kill -0 "$2" 2> /dev/null || ((SECONDS - $3 > $4)); then
            return 1
        fi
        sleep 2
    done
}

bench() {  # label, port, seconds left, bench flags...
    local label=$1 port=$2 left=$3
    shift 3
    timeout $((left > 1 ? left : 1)) python -m jaxsgl.bench_serving --backend jaxsgl --port "$port" \
        --label "$label" --output-file "$OUT/$label.json" "$@" > "$OUT/$label.log" 2>&1
}

serve() {  # label, cards, port, seconds, "server flags", bench flags...
    local label=$1 cards=$2 port=$3 limit=$4 flags=$5
    shift 5
    local t0=$SECONDS
    launch "$label" "$cards" "$port" "$flags"
    local server=$SERVER_PID
    if ! wait_up "$port" "$server" "$t0" "$limit"; then
        echo "== $label: the server did not come up"
        kill "$server" 2> /dev/null
        wait "$server" 2> /dev/null
        return
    fi
    local up=$((SECONDS - t0))
    bench "$label" "$port" $((limit - up)) "$@"
    echo "== $label (cards $cards): exit $?, server up in $up s, $((SECONDS - t0)) s in all"
    kill "$server"
    wait "$server" 2> /dev/null
}

mt_tp1_noradix() {
    serve mt-tp1-noradix "$1" 30000 420 "--context-length 4096 --disable-radix-cache" "${MT[@]}"
}

ceilings_radix_random() {  # the ceilings are measured first, while nothing else holds the card
    CUDA_VISIBLE_DEVICES=$1 python -m jaxsgl.roofline --out "$OUT/ceilings.json" \
        > "$OUT/ceilings.log" 2>&1
    serve mt-tp1-radix "$1" 30001 240 "--context-length 4096" "${MT[@]}"
    random-tp1 "$1" "$OUT/ceilings.json"
}

random-tp1() {  # cards, ceilings file
    serve random-tp1 "$1" 30003 200 "--context-length 1024" --dataset-name random \
        --random-input-len 512 --random-output-len 256 --num-prompts 1000 \
        --max-concurrency 256 --warmup-requests 8 --flush-cache --seed 1 \
        --roofline-model llama-3-8b --ceilings "$2"
}

tp2_dp2() {
    serve mt-tp2-radix "$1" 30002 220 "--context-length 4096 --tp-size 2" "${MT[@]}"
    serve mt-dp2-radix "$1" 30002 220 "--context-length 4096 --dp-size 2" "${MT[@]}"
}

table() {
    python benchmarks/serving_table.py "$OUT"/mt-*.json "$OUT"/random-tp1.json \
        --baseline "$OUT/mt-tp1-noradix.json"
}

serving-1() {
    mt_tp1_noradix 0 &
    ceilings_radix_random 1 &
    wait
}

serving-2() {
    tp2_dp2 0,1
    run backend_parity 120 0,1 python benchmarks/backend_parity.py --backends pallas \
        --tp-sizes 1 2 --expect benchmarks/backend_parity_cpu.json --out "$OUT/parity.json"
    tail -n 4 "$OUT/backend_parity.log"
    table
}

four-1() {
    (
        CUDA_VISIBLE_DEVICES=0 python -m jaxsgl.roofline --out "$OUT/ceilings.json" \
            > "$OUT/ceilings.log" 2>&1
        serve mt-tp1-noradix 0 30000 300 "--context-length 4096 --disable-radix-cache" "${MT[@]}"
        random-tp1 0 "$OUT/ceilings.json"
    ) &
    (
        serve mt-tp1-radix 1 30001 260 "--context-length 4096" "${MT[@]}"
        run one_batch_tp1 100 1 python -m jaxsgl.bench_one_batch "${MODEL[@]}" \
            --batch-size 1 128 --input-len 1024 --output-len 16 \
            --result-file "$OUT/one_batch.jsonl"
    ) &
    mt_tp2_radix 2,3 &
    wait
    table
}

four-mt() {  # the multi-turn rows only: TP 1 with and without radix, TP 2, then TP 4
    two-mt1 &  # cards 0 and 1; MT_LIMIT for the first three rows (start and run)
    mt_tp2_radix 2,3 &
    wait
    if [ "${MT_TP4:-1}" != 0 ]; then  # MT_TP4=0: the three rows above only
        serve mt-tp4-radix 0,1,2,3 30000 240 "--context-length 4096 --tp-size 4" "${MT[@]}"
    fi
    mt_table
}

two-mt1() {  # two cards: the TP 1 multi-turn rows side by side (two-mt2 then runs TP 2)
    local limit=${MT_LIMIT:-300}
    serve mt-tp1-noradix 0 30000 "$limit" "--context-length 4096 --disable-radix-cache" "${MT[@]}" &
    serve mt-tp1-radix 1 30001 "$limit" "--context-length 4096" "${MT[@]}" &
    wait
}

mt_tp2_radix() {  # cards
    serve mt-tp2-radix "$1" 30002 "${MT_LIMIT:-300}" "--context-length 4096 --tp-size 2" "${MT[@]}"
}

mt_table() {  # every multi-turn row of $OUT against TP 1 without the radix cache
    python benchmarks/serving_table.py "$OUT"/mt-*.json --baseline "$OUT/mt-tp1-noradix.json"
}

two-mt2() {
    mt_tp2_radix 0,1
    mt_table
}

two-mt-profile() {  # TP 2 + radix as in two-mt2, with a trace of 40 engine steps mid-run
    (
        until curl -sf --max-time 5 localhost:30002/health > /dev/null; do sleep 2; done
        sleep "${TRACE_AFTER:-25}"  # past the warm-up requests, into the timed run
        curl -s -X POST localhost:30002/start_profile \
            -d "{\"output_dir\": \"$OUT/trace\", \"num_steps\": 40}"
    ) &
    local tracer=$!
    serve mt-tp2-radix-traced 0,1 30002 "${MT_LIMIT:-300}" "--context-length 4096 --tp-size 2" \
        "${MT[@]}"
    kill "$tracer" 2> /dev/null
    python benchmarks/trace_summary.py "$OUT/trace"
}

kv8() {  # two cards side by side: bench_one_batch with the model's KV type (card 0), 8-bit (1)
    local args=(--batch-size 1 128 --input-len 2048 --output-len 16 --num-continuous-decode-steps 8)
    run one_batch_kv16 150 0 python -m jaxsgl.bench_one_batch "${MODEL[@]}" "${args[@]}" \
        --result-file "$OUT/one_batch_kv.jsonl" &
    run one_batch_kv8 150 1 python -m jaxsgl.bench_one_batch "${MODEL[@]}" "${args[@]}" \
        --kv-cache-dtype fp8_e4m3 --result-file "$OUT/one_batch_kv8.jsonl" &
    wait
    tail -n 4 "$OUT/one_batch_kv16.log" "$OUT/one_batch_kv8.log"
}

kernels8() {
    run kernels8 300 0 python benchmarks/kernel_bench.py --only decode --no-hopper \
        --kv-dtype float8_e4m3fn --out "$OUT/kernels8.json"
    tail -n 8 "$OUT/kernels8.log"
}

tp4-profile() {
    local args=(--batch-size 1 128 --input-len 1024 --output-len 16 --num-continuous-decode-steps 8
        --profile --result-file "$OUT/one_batch_profile.jsonl")
    JAXSGL_PROFILER_DIR="$OUT/traces" run one_batch_tp4_profile 150 0,1,2,3 \
        python -m jaxsgl.bench_one_batch "${MODEL[@]}" --tp-size 4 "${args[@]}"
    JAXSGL_PROFILER_DIR="$OUT/traces" run one_batch_tp1_profile 100 0 \
        python -m jaxsgl.bench_one_batch "${MODEL[@]}" "${args[@]}"
    local trace
    for trace in "$OUT"/traces/*; do
        [ -d "$trace" ] || continue
        echo "--- $trace"
        python benchmarks/trace_summary.py "$trace"
    done
}

tp4-variants() {
    run tp4_base 120 0,1,2,3 "${TP4_STEP[@]}" --result-file "$OUT/tp4_base.jsonl"
    XLA_FLAGS=--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true \
        run tp4_oneshot 120 0,1,2,3 "${TP4_STEP[@]}" --result-file "$OUT/tp4_oneshot.jsonl"
    XLA_FLAGS=--xla_gpu_enable_command_buffer=$GRAPHS,COLLECTIVES \
        run tp4_graph 120 0,1,2,3 "${TP4_STEP[@]}" --result-file "$OUT/tp4_graph.jsonl"
    run tp4_unrolled 200 0,1,2,3 "${TP4_STEP[@]}" --layers unrolled \
        --result-file "$OUT/tp4_unrolled.jsonl"
    local log
    for log in "$OUT"/tp4_*.log; do echo "--- $log"; tail -n 3 "$log"; done
}

tp4-launch() {
    local sync=--xla_gpu_disable_async_collectives=ALLREDUCE,ALLGATHER
    XLA_FLAGS=--xla_gpu_enable_command_buffer= \
        run tp4_nograph 120 0,1,2,3 "${TP4_STEP[@]}" --result-file "$OUT/tp4_nograph.jsonl"
    XLA_FLAGS=$sync run tp4_sync 120 0,1,2,3 "${TP4_STEP[@]}" --result-file "$OUT/tp4_sync.jsonl"
    XLA_FLAGS="--xla_gpu_enable_command_buffer= $sync" \
        run tp4_nograph_sync 120 0,1,2,3 "${TP4_STEP[@]}" \
        --result-file "$OUT/tp4_nograph_sync.jsonl"
    local log
    for log in "$OUT"/tp4_*.log; do echo "--- $log"; tail -n 3 "$log"; done
    JAXSGL_PROFILER_DIR="$OUT/traces" run tp4_bs1_profile 120 0,1,2,3 \
        python -m jaxsgl.bench_one_batch "${MODEL[@]}" --tp-size 4 --batch-size 1 \
        --input-len 1024 --output-len 16 --num-continuous-decode-steps 8 --profile
}

tp4-nccl() {
    local nccl=--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false
    local ar=(python benchmarks/allreduce_bench.py --tp-size 4 --batch-size 1 256
        --out "$OUT/allreduce.jsonl")
    XLA_FLAGS=$nccl run ar_nccl 90 0,1,2,3 "${ar[@]}" --label nccl
    XLA_FLAGS="$nccl --xla_gpu_enable_command_buffer=$GRAPHS,COLLECTIVES" \
        run ar_nccl_graph 90 0,1,2,3 "${ar[@]}" --label nccl-graph
    XLA_FLAGS=$nccl run tp4_nccl 120 0,1,2,3 "${TP4_STEP[@]}" --result-file "$OUT/tp4_nccl.jsonl"
    XLA_FLAGS="$nccl --xla_gpu_enable_command_buffer=$GRAPHS,COLLECTIVES" \
        run tp4_nccl_graph 120 0,1,2,3 "${TP4_STEP[@]}" \
        --result-file "$OUT/tp4_nccl_graph.jsonl"
    local log
    for log in "$OUT"/ar_*.log; do tail -n 3 "$log"; done
    for log in "$OUT"/tp4_*.log; do echo "--- $log"; tail -n 3 "$log"; done
}

allreduce() {
    nvidia-smi topo -m > "$OUT/topology.txt" 2>&1
    cat "$OUT/topology.txt"
    local ar=(python benchmarks/allreduce_bench.py --tp-size 2 4 --batch-size 1 128 256
        --out "$OUT/allreduce.jsonl")
    run ar_default 90 0,1,2,3 "${ar[@]}" --label default
    NCCL_PROTO=LL run ar_ll 90 0,1,2,3 "${ar[@]}" --label nccl-LL
    NCCL_PROTO=LL128 run ar_ll128 90 0,1,2,3 "${ar[@]}" --label nccl-LL128
    XLA_FLAGS=--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true \
        run ar_oneshot 90 0,1,2,3 "${ar[@]}" --label one-shot
    XLA_FLAGS=--xla_gpu_enable_command_buffer=$GRAPHS,COLLECTIVES \
        run ar_graph 90 0,1,2,3 "${ar[@]}" --label graph
    local log
    for log in "$OUT"/ar_*.log; do tail -n 7 "$log"; done
}

four-2() {
    serve mt-tp4-radix 0,1,2,3 30000 240 "--context-length 4096 --tp-size 4" "${MT[@]}"
    run one_batch_tp4 100 0,1,2,3 python -m jaxsgl.bench_one_batch "${MODEL[@]}" \
        --tp-size 4 --batch-size 1 128 --input-len 1024 --output-len 16 \
        --result-file "$OUT/one_batch.jsonl"
}

four-3() {  # replica 0 compiles the step shapes, the other three load them; MT_LIMIT seconds
    serve mt-dp4-radix 0,1,2,3 30000 "${MT_LIMIT:-390}" "--context-length 4096 --dp-size 4" "${MT[@]}"
}

four-3r() {  # DP 4 x TP 1 as four servers behind the router (MT_LIMIT seconds in all)
    routed mt-dp4r-radix "" 0 1 2 3
}

four-4r() {  # DP 2 x TP 2: two TP 2 servers behind the router (MT_LIMIT seconds in all)
    routed mt-dp2tp2r-radix "--tp-size 2" 0,1 2,3
}

routed() {  # label, "worker flags", each worker's cards...: the workers behind jaxsgl.router
    # The first worker compiles the step shapes; the others then start side by side, each in
    # its own process, and load them from its compilation cache.
    local label=$1 flags=$2 limit=${MT_LIMIT:-540} t0=$SECONDS pids=() urls=() i=0 cards
    shift 2
    for cards in "$@"; do
        launch "$label-worker$i" "$cards" $((30010 + i)) "--context-length 4096 $flags"
        pids+=("$SERVER_PID")
        urls+=("http://127.0.0.1:$((30010 + i))")
        if [ "$i" = 0 ] && wait_up 30010 "$SERVER_PID" "$t0" "$limit"; then
            echo "== $label: the first worker up in $((SECONDS - t0)) s"
        fi
        i=$((i + 1))
    done
    local up=ok
    for ((i = 1; i < $#; i++)); do
        wait_up $((30010 + i)) "${pids[$i]}" "$t0" "$limit" || up=
    done
    python -m jaxsgl.router --worker-urls "${urls[@]}" --port 30000 --log-level warning \
        > "$OUT/$label.router.log" 2>&1 &
    local router=$!
    pids+=("$router")
    if [ -n "$up" ] && wait_up 30000 "$router" "$t0" "$limit"; then
        local ready=$((SECONDS - t0))
        bench "$label" 30000 $((limit - ready)) "${MT[@]}"
        echo "== $label: exit $?, the workers and the router up in $ready s, $((SECONDS - t0)) s in all"
        # Its placements (cache or balance) and each worker's requests.
        curl -s --max-time 5 localhost:30000/metrics | grep '^jaxsgl_router' \
            > "$OUT/$label.router-metrics.txt"
    else
        echo "== $label: the servers did not come up"
    fi
    kill "${pids[@]}" 2> /dev/null
    wait "${pids[@]}" 2> /dev/null
}

probe() {
    # Lanes: the extend kernels on card 0 (the Hopper kernel's ragged checks first, in their
    # own process, as a hang there must not cost the sweep); greedy parity of both backends at
    # TP 1 and TP 2 on cards 2,3.
    (
        local skip=()
        run hopper_check 150 0 python benchmarks/kernel_bench.py --check-only || skip=(--no-hopper)
        run kernels 300 0 python benchmarks/kernel_bench.py --only extend "${skip[@]}" \
            --out "$OUT/kernels.json"
    ) &
    (
        PYTHONFAULTHANDLER=1 CUDA_VISIBLE_DEVICES=2,3 timeout -s ABRT 240 python \
            benchmarks/backend_parity.py --backends native pallas --tp-sizes 1 2 \
            --expect benchmarks/backend_parity_cpu.json --out "$OUT/parity.json" \
            > "$OUT/backend_parity.log" 2>&1
        echo "== backend_parity (cards 2,3): exit $?"
    ) &
    wait
    grep "^check" "$OUT/hopper_check.log" | cut -c1-300
    tail -n 12 "$OUT/kernels.log"
    tail -n 12 "$OUT/backend_parity.log"
}

hopper() {
    # One card: the engine with each extend kernel. Greedy outputs in bfloat16 (the Hopper
    # kernel's dtypes) of native and both pallas kernels, then prefill with each kernel.
    run parity_bf16 300 0 python benchmarks/backend_parity.py --dtype bfloat16 \
        --backends native pallas-triton pallas-hopper --out "$OUT/parity_bf16.json"
    local kernel
    for kernel in triton hopper; do
        JAXSGL_EXTEND_KERNEL=$kernel run "prefill_$kernel" 200 0 sh -c "
            python -m jaxsgl.bench_one_batch ${MODEL[*]} --batch-size 128 --input-len 1024 \
                --output-len 4 --result-file $OUT/prefill_$kernel.jsonl &&
            python -m jaxsgl.bench_one_batch ${MODEL[*]} --batch-size 8 --input-len 4096 \
                --output-len 4 --result-file $OUT/prefill_$kernel.jsonl"
    done
    tail -n 14 "$OUT/parity_bf16.log"
    for f in "$OUT"/prefill_*.log; do echo "--- $f"; tail -n 4 "$f"; done
}

"${@:?serving-1, engine, serving-2, two-mt1, two-mt2, two-mt-profile, kv8, kernels8, four-1, four-2, four-3, four-3r, four-4r, four-mt, tp4-profile, tp4-variants, tp4-launch, tp4-nccl, allreduce, probe, hopper or random-tp1 CARDS CEILINGS}"
