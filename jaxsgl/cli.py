"""`jaxsgl` command line: `generate` (stream a greedy chat answer) and `convert` (orbax copy)."""

from __future__ import annotations

import argparse
import logging
import sys

from jaxsgl.model.loader import DEFAULT_MODEL, DTYPES, LOAD_FORMATS


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-path",
        default=None,
        help=f"HF folder, .gguf file, converted folder or short name "
        f"(default: the embedded {DEFAULT_MODEL})",
    )
    p.add_argument("--load-format", default="auto", choices=LOAD_FORMATS)
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    p.add_argument("--tp-size", "--tensor-parallel-size", dest="tp_size", type=int, default=1)
    p.add_argument("--log-level", default="warning")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxsgl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="greedy answer to one chat prompt, streamed")
    _model_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--system", default=None, help="optional system message")
    gen.add_argument(
        "--raw",
        action="store_true",
        help="continue the prompt text as is, without the chat template",
    )
    gen.add_argument("--max-new-tokens", type=int, default=128)

    conv = sub.add_parser("convert", help="save a model with orbax for fast restarts")
    _model_args(conv)
    conv.add_argument("--output", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            return _generate(args)
        return _convert(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _load(args):
    from jaxsgl.model.loader import load_model, resolve_model_path
    from jaxsgl.sharding import make_mesh
    from jaxsgl.tokenizer import load_tokenizer

    if args.load_format == "dummy":
        raise ValueError("this command needs a tokenizer; dummy weights have none")
    loaded = load_model(
        args.model_path,
        load_format=args.load_format,
        dtype=args.dtype,
        mesh=make_mesh(args.tp_size),
    )
    return loaded, load_tokenizer(loaded.path or resolve_model_path(args.model_path))


def _generate(args) -> int:
    from jaxsgl.detokenizer import IncrementalDetokenizer
    from jaxsgl.model.recompute import RecomputeModel

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    loaded, tokenizer = _load(args)
    if args.raw:
        prompt = tokenizer.encode(args.prompt, add_special_tokens=True)
    else:
        messages = [{"role": "user", "content": args.prompt}]
        if args.system is not None:
            messages.insert(0, {"role": "system", "content": args.system})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    stop = tokenizer.eos_token_ids

    def show(step: list[int | None]) -> None:
        tok = step[0]
        if tok is not None and tok not in stop:
            sys.stdout.write(detok.add(tok))
            sys.stdout.flush()

    RecomputeModel(loaded.model).greedy([prompt], args.max_new_tokens, stop, on_tokens=show)
    sys.stdout.write(detok.flush() + "\n")
    return 0


def _convert(args) -> int:
    from jaxsgl.model.checkpoint import save_converted

    loaded, tokenizer = _load(args)
    out = save_converted(loaded, args.output, tokenizer)
    print(f"saved to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
