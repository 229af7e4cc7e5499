"""`python -m jaxsgl.router` as a process in front of two real SmolLM2 servers: grading into
pools, bad input, a worker added at run time, and a worker killed in the middle of a load.

The two workers start once for the module; the kill test runs last and takes one of them down.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import pytest
from server_fixture import MODEL, ROOT, ServerProcess, free_port, scrape

pytestmark = pytest.mark.slow

WORKER_FLAGS = ("--max-total-tokens", "4096", "--context-length", "512", "--skip-server-warmup")
WORKER = "X-Jaxsgl-Worker"


class RouterProcess:
    """A router subprocess on loopback; `get` and `scrape` work as on `ServerProcess`."""

    get = ServerProcess.get

    def __init__(self, *flags: str):
        self.url = f"http://127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "jaxsgl.router", "--host", "127.0.0.1"]
        cmd += ["--port", self.url.rsplit(":", 1)[1], "--health-check-interval", "0.5", *flags]
        self.log = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while self.get("/list_workers")[0] != 200:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()
            time.sleep(0.1)

    def workers(self) -> dict[str, dict]:
        status, body = self.get("/list_workers")
        assert status == 200, body
        return {w["url"]: w for w in json.loads(body)["workers"]}

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def __enter__(self) -> RouterProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self.log.close()
        assert code == 0, f"router exited with {code}"


@pytest.fixture(scope="module")
def pair():
    """Two workers, started side by side; the second serves the name "model-b"."""
    flags = [WORKER_FLAGS, (*WORKER_FLAGS, "--served-model-name", "model-b")]
    servers = [ServerProcess(*f) for f in flags]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(ServerProcess.start, servers))
    try:
        yield servers
    finally:
        for s in servers:
            if s.proc.poll() is None:
                s.stop()
            s.log.close()


async def post(session, url: str, body: dict, **headers) -> tuple[int, dict, str | None]:
    async with session.post(url, json=body, headers=headers) as r:
        return r.status, await r.json(content_type=None), r.headers.get(WORKER)


def ask(router: RouterProcess, calls: list[tuple[str, dict, dict]]) -> list[tuple]:
    """Send (path, body, headers) requests at once; their (status, body, worker)."""

    async def main():
        async with aiohttp.ClientSession() as s:
            tasks = [post(s, router.url + p, b, **h) for p, b, h in calls]
            return await asyncio.gather(*tasks)

    return asyncio.run(main())


def short(text: str = "The capital of France is", n: int = 4) -> dict:
    return {"text": text, "sampling_params": {"max_new_tokens": n, "temperature": 0}}


def test_grading_rules_send_requests_to_their_pool_and_bad_input_gets_error_bodies(pair, tmp_path):
    a, b = pair
    rules = tmp_path / "rules.json"
    rules.write_text(
        json.dumps(
            {
                "default_pool": "small",
                "rules": [
                    {"pool": "large", "when": {"model": "model-b"}},
                    {"pool": "large", "when": {"header": {"X-Request-Class": "batch"}}},
                    {"pool": "ghost", "when": {"header": {"X-Request-Class": "ghost"}}},
                ],
            }
        )
    )
    flags = [
        "--rules",
        str(rules),
        "--pool-workers",
        f"small={a.url}",
        f"--pool-workers=large={b.url}",
    ]
    with RouterProcess(*flags) as router:
        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        results = ask(
            router,
            [
                ("/generate", short(), {}),
                ("/v1/completions", {"prompt": "One, two,", "max_tokens": 2}, {}),
                ("/v1/chat/completions", chat, {}),
                ("/generate", short(), {"X-Request-Class": "batch"}),
                ("/v1/chat/completions", {**chat, "model": "model-b"}, {}),
            ],
        )
        assert [r[0] for r in results] == [200] * 5, results
        assert [r[2] for r in results] == [a.url] * 3 + [b.url] * 2
        assert results[4][1]["model"] == "model-b"
        counts = {u: w["requests_total"] for u, w in router.workers().items()}
        assert counts == {a.url: 3, b.url: 2}

        status, body = router.get("/v1/models")
        assert status == 200 and {m["id"] for m in json.loads(body)["data"]} >= {MODEL, "model-b"}
        bad = ask(
            router,
            [
                ("/generate", short(), {"X-Request-Class": "ghost"}),
                ("/v1/chat/completions", {"messages": [], "stream": 1}, {}),
                ("/add_worker", {"url": "localhost:1"}, {}),
            ],
        )
        assert [r[0] for r in bad] == [503, 400, 400]
        assert "pool 'ghost' has no workers" in bad[0][1]["error"]["message"]
        assert all(r[1]["error"]["code"] == r[0] for r in bad)
        status, body = _post_raw(router.url + "/generate", b'{"text": "unterminated')
        assert status == 400 and "not valid JSON" in json.loads(body)["error"]["message"]
        assert {u: w["requests_total"] for u, w in router.workers().items()} == counts


def _post_raw(url: str, data: bytes) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_a_worker_added_at_run_time_gets_traffic(pair):
    a, b = pair
    with RouterProcess("--worker-urls", a.url, "--policy", "round_robin") as router:
        assert [r[2] for r in ask(router, [("/generate", short(), {})] * 2)] == [a.url] * 2
        status, body = _post_raw(router.url + "/add_worker", json.dumps({"url": b.url}).encode())
        assert status == 200 and json.loads(body)["healthy"] is True, body
        served = [r[2] for r in ask(router, [("/generate", short(), {})] * 4)]
        assert Counter(served) == {a.url: 2, b.url: 2}
        workers = router.workers()
        assert workers[b.url]["pool"] == "default" and workers[b.url]["requests_total"] == 2


def test_bench_serving_runs_through_the_router_as_against_one_server_of_two_replicas(
    pair, tmp_path
):
    """/flush_cache reaches every worker, /server_info merges theirs (dp_size 2, counters
    added up), /model_info is a worker's: bench_serving's multi-turn run through the router
    counts two devices and the workers' steps."""
    a, b = pair
    with RouterProcess("--worker-urls", a.url, b.url) as router:
        deadline = time.monotonic() + 30  # a check may miss a worker still busy from before
        while not all(w["healthy"] for w in router.workers().values()):
            assert time.monotonic() < deadline, router.workers()
            time.sleep(0.2)
        status, body = _post_raw(router.url + "/flush_cache", b"")
        assert status == 200 and b"2 workers" in body, body
        assert [w.server_info()["num_cached_pages"] for w in pair] == [0, 0]
        out = tmp_path / "mt.json"
        bench = [sys.executable, "-m", "jaxsgl.bench_serving", "--backend", "jaxsgl",
                 "--base-url", router.url, "--dataset-name", "multi-turn", "--mt-num-sessions",
                 "4", "--mt-turns", "3", "--mt-turn-len", "32", "--mt-output-len", "8",
                 "--max-concurrency", "4", "--warmup-requests", "0", "--flush-cache",
                 "--seed", "3", "--output-file", str(out)]  # fmt: skip
        done = subprocess.run(bench, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        result = json.loads(out.read_text())
        assert result["summary"]["completed"] == 12 and result["summary"]["num_devices"] == 2
        # Each later turn goes where its session's earlier turns went and finds them cached:
        # the whole pages of what the last turn wrote (its prompt and all its tokens but the
        # last), 32 + 64 of each session's 32 + 72 + 112 prompt tokens.
        assert result["summary"]["cache_hit_rate"] == pytest.approx(96 / 216)
        each = [w.server_info() for w in pair]
        status, body = router.get("/server_info")
        assert status == 200, body
        merged = json.loads(body)
        assert merged["dp_size"] == 2 and merged["tp_size"] == 1 and merged["num_workers"] == 2
        for key in ("extend_steps_total", "decode_steps_total", "prompt_tokens_total"):
            assert merged[key] == each[0][key] + each[1][key], key
        assert merged["cache_hit_rate"] == pytest.approx(
            (each[0]["cached_tokens_total"] + each[1]["cached_tokens_total"])
            / merged["prompt_tokens_total"]
        )
        assert merged["integrity"] == [e["integrity"] for e in each]
        # The run's extend steps, as bench_serving recorded them, are the two workers' own.
        assert 0 < result["settings"]["server_extend_steps"] <= merged["extend_steps_total"]
        status, body = router.get("/model_info")
        assert status == 200 and json.loads(body) == json.loads(a.get("/model_info")[1])


async def read_stream(session, url: str, body: dict, started: asyncio.Event) -> tuple[str, list]:
    """(worker, events) of one stream; `started` is set at its first event."""
    events = []
    async with session.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if line.startswith(b"data: "):
                data = line[6:].strip()
                events.append(data.decode() if data == b"[DONE]" else json.loads(data))
                started.set()
        return r.headers[WORKER], events


async def kill_mid_load(router: RouterProcess, victim: ServerProcess) -> tuple[list, list]:
    """Four long streams and 40 short requests, half sent before and half after `victim` is
    killed (SIGKILL) while they run. Returns (streams, non-streaming results)."""
    native = {"text": "Count to one hundred:", "stream": True}
    native["sampling_params"] = {"max_new_tokens": 120, "ignore_eos": True}
    chat = {"messages": [{"role": "user", "content": "Tell a story."}], "stream": True}
    chat |= {"max_tokens": 120, "ignore_eos": True}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as s:
        streams, started = [], []
        for path, body in [("/generate", native), ("/v1/chat/completions", chat)] * 2:
            started.append(asyncio.Event())
            streams.append(
                asyncio.create_task(read_stream(s, router.url + path, body, started[-1]))
            )
            await started[-1].wait()  # round robin: streams alternate between the workers
        before = [post(s, router.url + "/generate", short(f"Question {i}:", 16)) for i in range(20)]
        before = [asyncio.create_task(c) for c in before]
        await asyncio.sleep(0.3)  # the victim's share is running
        victim.proc.kill()
        after = [post(s, router.url + "/generate", short(f"Item {i}:")) for i in range(20)]
        results = await asyncio.gather(*before, *after)
        return await asyncio.gather(*streams), results


def test_killing_a_worker_mid_load_loses_no_request_and_cuts_its_streams_cleanly(pair):
    """Runs last: it takes the second worker down."""
    a, b = pair
    with RouterProcess("--worker-urls", a.url, b.url, "--policy", "round_robin") as router:
        streams, results = asyncio.run(kill_mid_load(router, b))
        assert [r[0] for r in results] == [200] * 40, [r for r in results if r[0] != 200]
        assert all(r[1]["text"] for r in results)
        assert [w for w, _ in streams] == [a.url, b.url] * 2
        for worker, events in streams:
            assert events[-1] == "[DONE]" and all(isinstance(e, dict) for e in events[:-1])
            errors = [e for e in events[:-1] if "error" in e]
            if worker == a.url:
                assert not errors, errors
            else:  # cut at the kill: one error event, then [DONE]
                assert errors == [events[-2]] and errors[0]["error"]["code"] == 502
        workers = router.workers()
        assert workers[b.url]["healthy"] is False and workers[a.url]["healthy"] is True
        assert workers[b.url]["failures_total"] >= 2  # its two streams, at least
        retried = json.loads(router.get("/list_workers")[1])["retries_total"]["default"]
        assert retried >= 1  # requests running on the victim were sent again

        # afterwards the dead worker gets nothing; its counters stand still
        seen = workers[b.url]["requests_total"]
        served = [r[2] for r in ask(router, [("/generate", short(), {})] * 6)]
        assert served == [a.url] * 6
        metrics = scrape(router)
        by_worker = lambda name: {s[0]["worker"]: s[1] for s in metrics[name]}
        assert by_worker("jaxsgl_router_requests_total")[b.url] == seen
        assert by_worker("jaxsgl_router_worker_healthy") == {a.url: 1.0, b.url: 0.0}
        assert by_worker("jaxsgl_router_in_flight") == {a.url: 0.0, b.url: 0.0}
        assert metrics["jaxsgl_router_retries_total"] == [({"pool": "default"}, retried)]
