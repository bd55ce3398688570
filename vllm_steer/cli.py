"""The ``vllm-steer`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-steer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="steered vs unsteered generation on a tiny model built offline")
    demo.add_argument("--family", choices=["llama", "qwen2", "qwen3"], default="llama")
    demo.add_argument("--workdir", default="runs/demo", help="where the model and pack are written")
    demo.add_argument("--max-tokens", type=int, default=24)

    args = parser.parse_args(argv)
    if args.command == "demo":
        from vllm_steer.demo import run_demo

        return run_demo(family=args.family, workdir=args.workdir, max_tokens=args.max_tokens)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
