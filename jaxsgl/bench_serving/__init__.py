"""Online serving benchmark: streams requests to a running server (jaxsgl's native
`/generate` or any OpenAI-compatible API) under a chosen load and reports throughput, latency
distributions, prefix-cache hit rate and GPU-seconds per request.

    python -m jaxsgl.launch_server --port 30000 &
    python -m jaxsgl.bench_serving --backend jaxsgl --dataset-name random \\
        --random-input-len 512 --random-output-len 256 --num-prompts 200 --max-concurrency 32 \\
        --output-file run.json
    python -m jaxsgl.bench_serving plot run.json other.json --out cmp.png

Modules: `datasets` (workloads), `backends` (the HTTP targets), `runner` (arrivals and
concurrency), `metrics` (records and figures), `report` (table and files), `plot`, `cli`.
"""
