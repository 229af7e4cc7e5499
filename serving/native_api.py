"""SGLang's native routes: `/generate`, health, model and server info, cache flush, profiling."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

from aiohttp import web

from jaxsgl.profiler import TRACE
from serving.errors import HTTPError, json_body
from serving.server_state import STATE, ServerState
from serving.sse import SSEWriter

_GENERATE_KEYS = {
    "text", "input_ids", "sampling_params", "stream", "return_logprob", "logprob_start_len",
    "top_logprobs_num", "rid", "namespace", "return_text_in_logprobs", "image_data", "lora_path",
}  # fmt: skip


async def generate(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await json_body(request)
    unknown = sorted(set(body) - _GENERATE_KEYS)
    if unknown:
        raise HTTPError(400, f"unknown fields: {', '.join(unknown)}")
    if body.get("image_data") or body.get("lora_path"):
        raise HTTPError(400, "image_data and lora_path are not supported")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise HTTPError(400, f"stream must be a boolean, got {stream!r}")
    params = body.get("sampling_params") or {}
    if not isinstance(params, dict | list):
        raise HTTPError(400, "sampling_params must be an object or a list of objects")
    flags = {k: body[k] for k in ("logprob_start_len", "top_logprobs_num") if k in body}
    for key, value in flags.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise HTTPError(400, f"{key} must be an integer, got {value!r}")
    return_logprob = body.get("return_logprob", False)
    if not isinstance(return_logprob, bool):
        raise HTTPError(400, f"return_logprob must be a boolean, got {return_logprob!r}")
    namespace = body.get("namespace") or ""
    if not isinstance(namespace, str):
        raise HTTPError(400, "namespace must be a string")
    if body.get("input_ids") is not None and not isinstance(body["input_ids"], list):
        raise HTTPError(400, "input_ids must be a list of token ids or a list of such lists")
    rid = body.get("rid")
    rids = rid if isinstance(rid, list) else [rid]
    if rid is not None and not all(isinstance(r, str) for r in rids):
        raise HTTPError(400, "rid must be a string or a list of strings")
    reqs, batched = await state.make_requests(
        body.get("text"),
        body.get("input_ids"),
        params,
        return_logprob,
        flags.get("top_logprobs_num", 0),
        namespace=namespace,
        rid=rid,
        logprob_start_len=flags.get("logprob_start_len", -1),
    )
    if stream:
        return await _stream(request, state, reqs)
    text = {r.rid: "" for r in reqs}
    final: dict[str, dict] = {}
    async for ev in state.events(reqs):
        text[ev["rid"]] += ev["text"]
        if ev["finished"]:
            final[ev["rid"]] = ev["meta_info"]
    results = [
        {"text": text[r.rid], "output_ids": list(r.output_ids), "meta_info": final[r.rid]}
        for r in reqs
    ]
    return web.json_response(results if batched else results[0])


async def _stream(request, state: ServerState, reqs) -> web.StreamResponse:
    """Each chunk carries the request's whole text and ids so far, as SGLang streams them.
    Events that arrived together make one chunk a request (the latest state), so a server
    under load writes fewer, not longer, chunks."""
    sse = SSEWriter()
    await sse.start(request)
    text = {r.rid: "" for r in reqs}
    index = {r.rid: i for i, r in enumerate(reqs)}
    try:
        async with contextlib.aclosing(state.event_batches(reqs)) as batches:
            async for batch in batches:
                latest = {}
                for ev in batch:
                    text[ev["rid"]] += ev["text"]
                    latest[ev["rid"]] = ev
                for rid, ev in latest.items():
                    await sse.send(
                        {
                            "text": text[rid],
                            "output_ids": list(reqs[index[rid]].output_ids),
                            "meta_info": ev["meta_info"],
                            "index": index[rid],
                        }
                    )
    except HTTPError as e:
        await sse.send({"error": {"message": e.message, "type": e.type, "code": e.status}})
    await sse.done()
    return sse.response


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    alive = state.generator.alive
    return web.Response(status=200 if alive else 503, text="ok" if alive else "engine stopped")


async def health_generate(request: web.Request) -> web.Response:
    """A real one-token generation through the engine."""
    state = request.app[STATE]
    reqs, _ = await state.make_requests(
        None,
        [state.generator.engine.loaded.config.bos_token_id or 0],
        {"max_new_tokens": 1, "temperature": 0},
        False,
        0,
    )
    try:
        async with asyncio.timeout(60):
            async for _ in state.events(reqs):
                pass
    except TimeoutError:
        return web.Response(status=503, text="generation timed out")
    return web.Response(text="ok")


async def model_info(request: web.Request) -> web.Response:
    state = request.app[STATE]
    engine = state.generator.engine
    return web.json_response(
        {
            "model_path": str(engine.loaded.path or state.generator.options.model_path),
            "tokenizer_path": str(engine.loaded.path or ""),
            "served_model_name": state.model_name,
            "is_generation": True,
            "context_length": engine.context_length,
            "vocab_size": engine.loaded.config.vocab_size,
            **_chat_info(state.generator),
        }
    )


async def server_info(request: web.Request) -> web.Response:
    state = request.app[STATE]
    options = dataclasses.asdict(state.generator.options)
    integrity = await asyncio.to_thread(state.generator.check_integrity)
    return web.json_response(
        {
            **options,
            **state.generator.metrics(),
            "integrity": integrity,
            "version": _version(),
        }
    )


async def start_profile(request: web.Request) -> web.Response:
    """SGLang's `/start_profile`: a JAX profiler trace of the server (device and host), into
    `output_dir` (default $JAXSGL_PROFILER_DIR or /tmp/jaxsgl_profile), until `/stop_profile`
    or for `num_steps` engine steps."""
    body = await json_body(request) if request.can_read_body else {}
    unknown = sorted(set(body) - {"output_dir", "num_steps"})
    if unknown:
        raise HTTPError(400, f"unknown fields: {', '.join(unknown)}")
    try:
        folder = await asyncio.to_thread(TRACE.start, body.get("output_dir"), body.get("num_steps"))
    except ValueError as e:
        raise HTTPError(400, str(e)) from None
    return web.Response(text=f"Start profiling. Trace folder: {folder}\n")


async def stop_profile(request: web.Request) -> web.Response:
    try:
        folder = await asyncio.to_thread(TRACE.stop)
    except ValueError as e:
        raise HTTPError(400, str(e)) from None
    return web.Response(text=f"Stop profiling. Trace written to {folder}\n")


async def flush_cache(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not await asyncio.to_thread(state.generator.flush_cache):
        raise HTTPError(400, "cache not flushed: requests are running")
    return web.Response(text="Cache flushed.")


def _chat_info(generator) -> dict:
    """What a client needs to render the chat template itself (the frontend language)."""
    tok = generator.tokenizer
    if tok is None:
        return {"chat_template": None}
    bos, eos = tok.hf.bos_token, tok.hf.eos_token
    return {"chat_template": tok.chat_template, "bos_token": bos, "eos_token": eos}


def _version() -> str:
    import jaxsgl

    return jaxsgl.__version__
