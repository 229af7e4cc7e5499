"""Turning one step's results into request state and events."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jaxsgl.engine.model_runner import StepResult
from jaxsgl.engine.request import Request
from jaxsgl.engine.scheduler import ScheduledBatch

if TYPE_CHECKING:
    from jaxsgl.engine.engine import Engine


def record_step(engine: Engine, batch: ScheduledBatch, result: StepResult) -> None:
    """Advance each request of `batch` by what the step computed and sampled."""
    row = 0  # position among the target (prompt logprob) rows
    for i, (req, chunk, sampled) in enumerate(
        zip(batch.reqs, batch.chunks, batch.sample, strict=True)
    ):
        n = len(chunk.tokens)
        if chunk.all_logits:
            _record_prompt_logprobs(req, chunk.prefix_len, n, result, row)
            row += n
        else:
            row += 1
        req.kv_len += n
        if not sampled:
            continue
        if req.return_logprob:
            top = None
            if req.top_logprobs_num:
                k = req.top_logprobs_num
                top = list(
                    zip(
                        result.top_logprobs[i, :k].tolist(),
                        result.top_ids[i, :k].tolist(),
                        strict=True,
                    )
                )
            req.output_logprobs.append((float(result.logprobs[i]), int(result.tokens[i]), top))
        state = engine.outputs[id(req)]
        state.add_token(int(result.tokens[i]), engine.context_length, engine.eos_ids)
        engine.stats.generation_tokens += 1
        if req.grammar is not None:
            _advance_grammar(engine, req, int(result.tokens[i]))
        engine.stats.token_times.append(req.last_token_time)
        if len(req.output_ids) == 1:
            engine.stats.ttft.append(req.first_token_time - req.arrival_time)
        elif req.last_token_time is not None and state.prev_token_time is not None:
            engine.stats.itl.append(req.last_token_time - state.prev_token_time)
        state.prev_token_time = req.last_token_time
    # Prompts' computed pages join the cache now; mixed decode rows, like decode steps, add
    # theirs when the request finishes.
    if batch.kind == "extend":
        for req in batch.reqs[: len(batch.reqs) - batch.num_mixed]:
            if req.finish_reason is None:
                engine.scheduler.kv.cache_computed(req)


def _advance_grammar(engine: Engine, req: Request, token: int) -> None:
    """Feed the grammar its new token; then append what it forces (jump-forward) and finish
    the request where the grammar is complete.

    Forced tokens join `output_ids` without being sampled (logprob 0: certain under the
    grammar); the request then has more than one token to compute, so its next step is an
    extend over its cached prefix rather than a decode.
    """
    if req.finish_reason is not None:  # eos, a stop or the length limit came first
        return
    grammar, state = req.grammar, engine.outputs[id(req)]
    grammar.advance(token)
    if not engine.options.disable_jump_forward and not grammar.done:
        for forced in grammar.forced_tokens():
            state.add_token(forced, engine.context_length, engine.eos_ids)
            req.num_forced_tokens += 1
            engine.stats.generation_tokens += 1
            engine.stats.jump_forward_tokens += 1
            if req.return_logprob:
                top = [(0.0, forced)] if req.top_logprobs_num else None
                req.output_logprobs.append((0.0, forced, top))
            if req.finish_reason is not None:
                return
            grammar.advance(forced)
    if grammar.done:
        state.grammar_complete()


def _record_prompt_logprobs(req: Request, start: int, n: int, result: StepResult, row: int):
    """Row j of the chunk predicts prompt token start + j + 1."""
    if not req.prompt_logprobs and req.logprob_start_len == 0:
        req.prompt_logprobs.append((None, req.prompt_ids[0], None))  # nothing predicts token 0
    k = req.top_logprobs_num
    for j in range(n):
        pos = start + j + 1
        if pos >= len(req.prompt_ids):
            break
        if pos < req.logprob_start_len or len(req.prompt_logprobs) > pos - req.logprob_start_len:
            continue
        top = None
        if k:
            top = list(
                zip(
                    result.target_top_logprobs[row + j, :k].tolist(),
                    result.target_top_ids[row + j, :k].tolist(),
                    strict=True,
                )
            )
        req.prompt_logprobs.append(
            (float(result.target_logprobs[row + j]), req.prompt_ids[pos], top)
        )


def meta_info(engine: Engine, req: Request) -> dict[str, Any]:
    end = req.last_token_time or req.arrival_time
    info: dict[str, Any] = {
        "id": req.rid,
        "finish_reason": req.finish_reason,
        "prompt_tokens": len(req.prompt_ids),
        "completion_tokens": len(req.output_ids),
        "cached_tokens": req.num_cached_tokens,
        "e2e_latency": end - req.arrival_time,
        "ttft": None if req.first_token_time is None else req.first_token_time - req.arrival_time,
    }
    if req.grammar is not None:
        info["jump_forward_tokens"] = req.num_forced_tokens
    if req.return_logprob:
        info["input_token_logprobs"] = [[lp, t, None] for lp, t, _ in req.prompt_logprobs]
        info["output_token_logprobs"] = [[lp, t, None] for lp, t, _ in req.output_logprobs]
        if req.top_logprobs_num:
            info["input_top_logprobs"] = [_top(top) for _, _, top in req.prompt_logprobs]
            info["output_top_logprobs"] = [_top(top) for _, _, top in req.output_logprobs]
    return info


def _top(top):
    return None if top is None else [[lp, t, None] for lp, t in top]


def emit(engine: Engine, req: Request, finished: bool) -> None:
    """Send the request's new text and ids (and, when finished, everything) to its caller."""
    if req.on_event is None:
        return
    state = engine.outputs[id(req)]
    text, ids = state.delta(finished)
    if not finished and not ids:
        return
    req.on_event(
        {
            "rid": req.rid,
            "text": text,
            "token_ids": ids,
            "finished": finished,
            "meta_info": meta_info(engine, req),
        }
    )
