"""``dreamcord`` — the command line: a stable contract that other tools and tests call.

Bad input exits with code 2 and one sentence on stderr (with ``--json``, also ``{"error": ...}`` on
stdout). ``bot.py`` adds the ``run`` command, which is the only one that needs discord.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipelines.cli_assets import add_asset_commands
from pipelines.cli_generate import add_generate, add_preprocess
from pipelines.cli_queue import add_queue_commands
from storage.errors import BotError

__all__ = ["build_parser", "main"]

log = logging.getLogger(__name__)

Command = Callable[[argparse.Namespace], int]


class UsageError(BotError):
    """Bad command-line usage (argparse's own errors are turned into this)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one sentence and exit code 2, like every other bad input
        raise UsageError(f"{message[0].upper()}{message[1:]}; see `{self.prog} --help`.")


def build_parser(extra: dict[str, tuple[str, Command]] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="dreamcord", description="Stable Diffusion for Discord: the command line.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_generate(sub, _cmd_generate)
    add_preprocess(sub, _cmd_preprocess)
    add_asset_commands(sub, _Parser, _cmd_check_asset, _cmd_assets)
    add_queue_commands(sub, {"worker": _cmd_worker, "queue": _cmd_queue, "cancel": _cmd_cancel})

    p = sub.add_parser("explain-prompt", help="how the webui's prompt language reads a prompt")
    p.add_argument("text")
    p.add_argument("--steps", type=int, default=20, help="sampling steps, for prompt editing (default 20)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_explain_prompt)

    p = sub.add_parser("pnginfo", help="show the generation parameters stored in an image")
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_pnginfo)

    models = sub.add_parser("models", help="the models this bot can use")
    models_sub = models.add_subparsers(dest="models_command", required=True, parser_class=_Parser)
    p = models_sub.add_parser("list", help="list models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_models_list)

    tiny = sub.add_parser("tiny-model", help="the built-in offline models")
    tiny_sub = tiny.add_subparsers(dest="tiny_command", required=True, parser_class=_Parser)
    p = tiny_sub.add_parser("build", help="build the tiny model family (deterministic, offline)")
    p.add_argument("--dir", type=Path, default=None, help="default: <data_dir>/tiny-models")
    p.set_defaults(func=_cmd_tiny_build)

    p = sub.add_parser("demo", help="generate one image per mode and write out/index.html")
    p.add_argument("--out", type=Path, default=Path("out"))
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="engine overhead vs the bare diffusers call, as JSON")
    p.add_argument("--repeats", type=int, default=15, help="timed pairs per size (shared machines are noisy)")
    p.add_argument("--sizes", default="64,256", help="comma-separated square sizes")
    p.add_argument("--json", action="store_true", help="(always JSON; accepted for symmetry)")
    p.add_argument(
        "--adapters",
        action="store_true",
        help="also time jobs alternating LoRA A, LoRA B and none (builds a 2 GB SD 1.5-shaped model once)",
    )
    p.set_defaults(func=_cmd_bench)

    for name, (help_text, func) in (extra or {}).items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--json", action="store_true", help="compact JSON (where the command prints JSON)")
        p.set_defaults(func=func)
    return parser


# --- commands ------------------------------------------------------------------------------------


class _ProgressBar:
    """A one-line progress bar on stderr, drawn only on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] step {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _cmd_generate(args: argparse.Namespace) -> int:
    from pipelines.cli_generate import run_generate

    return run_generate(args, _ProgressBar(sys.stderr.isatty() and not args.json))


def _cmd_worker(args: argparse.Namespace) -> int:
    from pipelines.cli_queue import run_worker

    return run_worker(args)


def _cmd_queue(args: argparse.Namespace) -> int:
    from pipelines.cli_queue import run_queue

    return run_queue(args)


def _cmd_cancel(args: argparse.Namespace) -> int:
    from pipelines.cli_queue import run_cancel

    return run_cancel(args)


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from pipelines.cli_generate import run_preprocess

    return run_preprocess(args)


def _cmd_check_asset(args: argparse.Namespace) -> int:
    from pipelines.cli_assets import run_check_asset

    return run_check_asset(args)


def _cmd_assets(args: argparse.Namespace) -> int:
    from pipelines.cli_assets import run_assets

    return run_assets(args)


def _cmd_explain_prompt(args: argparse.Namespace) -> int:
    from pipelines.prompt_chunks import explain

    if not 1 <= args.steps <= 1000:
        raise UsageError("Steps must be between 1 and 1000.")
    report = explain(args.text, steps=args.steps)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    print("weights:  " + "  ".join(f"[{t}]" if w == -1 else f"{t!r}×{w:.3g}" for t, w in report["weights"]))
    for until, text in report["schedule"]:
        print(f"until step {until}: {text}")
    for net in report["networks"]:
        print(f"{net['type']} {net['name']} at {net['weight']:g}")
    print(f"{report['tokens']} tokens in {report['chunks']} chunk(s) of 75")
    return 0


def _cmd_pnginfo(args: argparse.Namespace) -> int:
    from pipelines.pnginfo import read_info

    try:
        data = args.file.read_bytes()
    except OSError as exc:
        raise UsageError(f"Cannot read {args.file}: {exc.strerror or exc}.") from exc
    info = read_info(data)
    payload = {
        "tool": info.tool,
        "prompt": info.prompt,
        "negative_prompt": info.negative_prompt,
        "parameters": info.parameters,
    }
    if args.json:
        print(json.dumps(payload, ensure_ascii=False))
    elif info.tool is None:
        print("No generation parameters found in this image.")
    else:
        print(f"Made with {info.tool}")
        print(info.raw)
    return 0


def _cmd_models_list(args: argparse.Namespace) -> int:
    from pipelines.settings import build_registry, load_settings

    registry = build_registry(load_settings())
    rows = [
        {
            "name": e.name,
            "family": str(e.family) if e.family else None,
            "source": str(e.kind),
            "location": e.location,
            "default": e.name == registry.default_name,
        }
        for e in registry.list()
    ]
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            mark = "*" if row["default"] else " "
            print(f"{mark} {row['name']:<24} {row['family'] or '?':<6} {row['source']:<12} {row['location']}")
    return 0


def _cmd_tiny_build(args: argparse.Namespace) -> int:
    from models.tiny import ensure_tiny_models
    from pipelines.settings import load_settings

    root = args.dir or load_settings().tiny_models_dir
    ensure_tiny_models(root)
    print(f"Tiny models ready in {root}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import run_demo
    from pipelines.settings import load_settings

    index = asyncio.run(run_demo(load_settings(), args.out))
    print(f"Gallery written to {index}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from pipelines.bench import run_bench
    from pipelines.bench_queue import run_queue_bench
    from pipelines.settings import load_settings

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    settings = load_settings()
    overhead = asyncio.run(run_bench(settings, sizes=sizes, repeats=args.repeats))
    queue = asyncio.run(run_queue_bench(settings, repeats=max(3, args.repeats // 3)))
    first: dict[str, Any] = next(iter(overhead["sizes"].values()), {})
    report: dict[str, Any] = {
        "batching_speedup": queue.pop("batching_speedup"),
        "engine_overhead": first.get("ratio_median"),
        "loop_lag_p99_ms": queue.pop("loop_lag_p99_ms"),
        "queue_1000": queue.pop("queue_1000"),
        "goals": {"batching_speedup_min": 2.0, "engine_overhead_max": 1.03, "loop_lag_p99_ms_max": 50},
        "batching": queue["batching"],
        "engine_overhead_by_size": overhead,
    }
    if args.adapters:
        from pipelines.bench_adapters import run_adapter_bench

        report["adapters"] = asyncio.run(run_adapter_bench(settings))
    print(json.dumps(report, indent=2))
    return 0


# --- entry point ---------------------------------------------------------------------------------


def _wants_json(argv: Sequence[str]) -> bool:
    return "--json" in argv


def _quiet_libraries() -> None:
    """Keep library chatter off the terminal without importing the libraries (keeps light commands fast)."""
    for key, value in (
        ("TOKENIZERS_PARALLELISM", "false"),
        ("DIFFUSERS_VERBOSITY", "error"),
        ("TRANSFORMERS_VERBOSITY", "error"),
    ):
        os.environ.setdefault(key, value)


def main(argv: Sequence[str] | None = None, extra: dict[str, tuple[str, Command]] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(extra).parse_args(argv)
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        _quiet_libraries()
        code: int = args.func(args)
        return code
    except BotError as exc:
        message = str(exc)
        print(message, file=sys.stderr)
        if _wants_json(argv):
            print(json.dumps({"error": message}))
        return 2
