"""The router's proxying against in-process fake workers: retries, cut streams, dead workers,
admin routes, error bodies and metrics. Fast and deterministic; `test_router_e2e.py` does the
same against real servers."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from jaxsgl.router.app import RouterConfig, create_app
from jaxsgl.router.proxy import WORKER_HEADER
from jaxsgl.router.rules import parse_rules
from jaxsgl.router.workers import WorkerSet


class FakeWorker:
    """Answers `/generate` with its own name; a test flips how it fails."""

    def __init__(self, name: str):
        self.name = name
        self.healthy = True
        self.status = 200  # of /generate
        self.cut_streams = False  # die after the first event of a stream
        self.hang_streams = False  # fall silent (and unhealthy) after the first event
        self.hits = 0
        self.server: TestServer | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_post("/generate", self._generate)
        app.router.add_get("/v1/models", self._models)
        self.server = TestServer(app)
        await self.server.start_server()
        return str(self.server.make_url("")).rstrip("/")

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.name}]})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.hits += 1
        if self.status != 200:
            return web.json_response({"error": {"message": "busy"}}, status=self.status)
        if not body.get("stream"):
            return web.json_response({"text": self.name})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"text": "a"}\n\n')
        if self.cut_streams:
            self.healthy = False
            await response.write(b'data: {"text": "half an ev')
            await asyncio.sleep(0.05)
            request.transport.close()  # the process died
            return response
        if self.hang_streams:
            self.healthy = False
            await asyncio.sleep(3600)  # stopped, not dead: the socket stays open
        await response.write(b'data: {"text": "ab"}\n\ndata: [DONE]\n\n')
        return response


def run_router(test, n_workers=2, policy="round_robin", rules=None, api_key=None, **config):
    """Run `await test(client, fakes)` against a router in front of `n_workers` fakes."""
    graded = parse_rules(rules or [])
    config.setdefault("health_interval_s", 60.0)  # tests make workers fail themselves

    async def main():
        fakes = [FakeWorker(f"w{i}") for i in range(n_workers)]
        urls = [await f.start() for f in fakes]
        workers = WorkerSet(policy)
        for url in urls:
            workers.add(url, graded.default_pool)
        app = create_app(workers, RouterConfig(rules=graded, **config), api_key)
        async with TestClient(TestServer(app)) as client:
            try:
                await test(client, fakes)
            finally:
                for f in fakes:
                    await f.server.close()

    asyncio.run(main())


async def post(client, path="/generate", body=None, **kw):
    r = await client.post(path, data=json.dumps(body or {"text": "hi"}), **kw)
    return r.status, await r.read(), r.headers.get(WORKER_HEADER)


async def listed(client) -> dict[str, dict]:
    r = await client.get("/list_workers")
    return {w["url"]: w for w in (await r.json())["workers"]}


def test_a_cut_stream_ends_with_an_error_event_and_its_worker_gets_no_more_traffic():
    async def test(client, fakes):
        fakes[0].cut_streams = True
        status, body, served_by = await post(client, body={"text": "x", "stream": True})
        assert status == 200 and served_by.endswith(str(fakes[0].server.port))
        events = body.decode().split("\n\n")
        assert events[0] == 'data: {"text": "a"}'  # the half event is dropped, not relayed
        assert json.loads(events[1].removeprefix("data: "))["error"]["code"] == 502
        assert events[2:] == ["data: [DONE]", ""]
        for _ in range(4):
            status, body, _ = await post(client)
            assert (status, json.loads(body)) == (200, {"text": "w1"})
        assert fakes[0].hits == 1
        workers = list((await listed(client)).values())
        assert [w["healthy"] for w in workers] == [False, True]
        assert [w["failures_total"] for w in workers] == [1, 0]
        assert [w["requests_total"] for w in workers] == [1, 4]
        assert all(w["in_flight"] == 0 for w in workers)

    run_router(test)


def test_a_stream_from_a_worker_that_falls_silent_ends_once_it_fails_its_check():
    async def test(client, fakes):
        fakes[0].hang_streams = True
        status, body, _ = await asyncio.wait_for(
            post(client, body={"text": "x", "stream": True}), timeout=10
        )
        events = body.decode().split("\n\n")
        assert status == 200 and events[0] == 'data: {"text": "a"}'
        assert "stopped answering" in json.loads(events[1][6:])["error"]["message"]
        assert events[2:] == ["data: [DONE]", ""]

    run_router(test, n_workers=1, health_interval_s=0.1)


def test_a_whole_stream_is_passed_through():
    async def test(client, fakes):
        status, body, _ = await post(client, body={"text": "x", "stream": True})
        assert status == 200
        assert body == b'data: {"text": "a"}\n\ndata: {"text": "ab"}\n\ndata: [DONE]\n\n'

    run_router(test, n_workers=1)


def test_failed_requests_are_retried_on_another_worker():
    async def test(client, fakes):
        await fakes[0].server.close()  # refuses connections; the router has not noticed yet
        fakes[1].status = 503  # draining: answers, but takes no work
        status, body, _ = await post(client)
        assert status == 503 and json.loads(body)["error"]["type"] == "server_error"
        assert "no healthy worker left" in json.loads(body)["error"]["message"]
        fakes[1].status = 200
        status, body, _ = await post(client)
        assert (status, json.loads(body)) == (200, {"text": "w1"})
        workers = list((await listed(client)).values())
        assert [w["healthy"] for w in workers] == [False, True]  # 503 is not death
        assert [w["requests_total"] for w in workers] == [1, 2]
        samples = await scrape(client)
        assert samples["jaxsgl_router_retries_total"] == [({"pool": "default"}, 1.0)]
        assert sorted(v for _, v in samples["jaxsgl_router_worker_healthy"]) == [0.0, 1.0]

    run_router(test, policy="round_robin")


def test_bad_input_and_missing_workers_get_openai_error_bodies():
    rules = [{"pool": "ghost", "when": {"header": {"X-Request-Class": "batch"}}}]

    async def test(client, fakes):
        cases = [
            (await client.post("/generate", data=b"{not json"), 400, "not valid JSON"),
            (await client.post("/v1/completions", data=b"[1]"), 400, "must be a JSON object"),
            (await client.post("/generate", json={"stream": "yes"}), 400, "stream must be"),
            (
                await client.post("/generate", json={}, headers={"X-Request-Class": "batch"}),
                503,
                "pool 'ghost' has no workers",
            ),
            (await client.post("/add_worker", json={"url": "ftp://x"}), 400, "http:// or"),
            (await client.post("/add_worker", json={"pool": "a"}), 400, "missing field: url"),
            (await client.post("/remove_worker", json={"url": "http://nope"}), 404, "no worker"),
            (await client.get("/nowhere"), 404, "Not Found"),
        ]
        for r, status, message in cases:
            error = (await r.json())["error"]
            assert (r.status, error["code"]) == (status, status), error
            assert message in error["message"] and error["type"]

    run_router(test, n_workers=1, rules=rules)


def test_admin_routes_add_and_remove_workers_at_run_time():
    async def test(client, fakes):
        extra = FakeWorker("extra")
        url = await extra.start()
        try:
            r = await client.post("/add_worker", json={"url": url + "/", "pool": "default"})
            assert r.status == 200 and (await r.json())["healthy"] is True
            r = await client.post("/add_worker", json={"url": url})
            assert r.status == 400 and "already registered" in (await r.json())["error"]["message"]
            served = [json.loads((await post(client))[1])["text"] for _ in range(4)]
            assert served == ["w0", "extra", "w0", "extra"]
            r = await client.get("/v1/models")
            assert {m["id"] for m in (await r.json())["data"]} == {"w0"}  # one worker per pool
            for u in (url, str(fakes[0].server.make_url(""))):
                assert (await client.post("/remove_worker", json={"url": u})).status == 200
            assert await listed(client) == {}
            r = await client.get("/health")
            assert r.status == 503
            status, body, _ = await post(client)
            assert status == 503 and "has no workers" in json.loads(body)["error"]["message"]
            assert (extra.hits, fakes[0].hits) == (2, 2)
        finally:
            await extra.server.close()

    run_router(test, n_workers=1)


def test_an_api_key_guards_all_but_health_and_metrics():
    async def test(client, fakes):
        assert (await client.get("/health")).status == 200
        assert (await client.get("/metrics")).status == 200
        for path in ("/list_workers", "/v1/models"):
            r = await client.get(path)
            assert r.status == 401 and (await r.json())["error"]["type"] == "authentication_error"
        status, _, _ = await post(client, headers={"Authorization": "Bearer k"})
        assert status == 200

    run_router(test, n_workers=1, api_key="k")


def test_cache_aware_routing_is_counted_by_decision():
    async def test(client, fakes):
        prompt = {"text": "You are a helpful bot. " * 4 + "Hello"}
        served = {(await post(client, body=prompt))[2] for _ in range(3)}
        assert len(served) == 1  # the prefix stays where it was sent
        samples = await scrape(client)
        routed = {s[0]["decision"]: s[1] for s in samples["jaxsgl_router_cache_aware_routed_total"]}
        assert routed == {"cache": 2.0, "balance": 1.0}
        requests = {s[0]["worker"]: s[1] for s in samples["jaxsgl_router_requests_total"]}
        assert sorted(requests.values()) == [0.0, 3.0]

    run_router(test, policy="cache_aware")


async def scrape(client) -> dict[str, list[tuple[dict, float]]]:
    text = await (await client.get("/metrics")).text()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples
