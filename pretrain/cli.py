"""`vit-pretrain` subcommands. Thin: parse, hand to the module that owns the work, map errors to exit codes.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
modules are imported only when their subcommand runs, so `vit-pretrain config` stays fast.
Exit status: 0 success, 2 user error (one line, no traceback), anything else is a bug.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from pretrain.errors import EXIT_USER_ERROR, UserError

# subcommand -> (module, one-line help)
COMMANDS = {
    "shards": ("pretrain.data.writer", "write WebDataset shards from an image folder, CSV/JSONL, Parquet, digits or synthetic:N"),
    "train": ("pretrain.engine.trainer", "train (supervised, mae, finetune, linprobe) from a config"),
    "export": ("pretrain.export", "export a run's checkpoint to a timm-loadable safetensors file"),
    "eval": ("pretrain.evaluation.command", "evaluate exported weights on labelled shards (JSON out)"),
    "visualize": ("pretrain.viz.visualize", "patch grid, attention per head, rollout and MAE reconstruction as PNGs"),
    "config": ("pretrain.cli", "print the resolved config"),
    "bench": ("pretrain.bench", "benchmarks: ours vs a baseline in the same run"),
    "quickstart": ("pretrain.quickstart", "digits: shards, MAE pretrain, export, fine-tune, probe, eval"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `vit-pretrain config`."""
    parser.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr_per_256=3e-4")


def run(args: argparse.Namespace) -> int:
    from pretrain.config import load_config, split_config_args, to_yaml
    from pretrain.models.archs import check_model_config

    config, overrides = split_config_args(args.config, args.overrides)
    cfg = load_config(config, overrides)
    check_model_config(cfg.model, cfg.task.kind)
    sys.stdout.write(to_yaml(cfg))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line, pointing at --help (not the usage block)."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vit-pretrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, description=help_)  # arguments: see main()
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in COMMANDS:
        # build only the chosen subcommand's arguments (its module may import torch, timm, deepspeed)
        name = argv[0]
        sub = _Parser(prog=f"vit-pretrain {name}", description=COMMANDS[name][1])
        try:
            module = importlib.import_module(COMMANDS[name][0])
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("pretrain"):
                print(f"vit-pretrain: error: '{name}' is not available in this build ({e.name})", file=sys.stderr)
                return EXIT_USER_ERROR
            raise
        module.add_arguments(sub)
        args = sub.parse_args(argv[1:])
        try:
            return int(module.run(args) or 0)
        except UserError as e:
            print(f"vit-pretrain {name}: error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            return 130
    parser.parse_args(argv)  # prints usage / help, exits 2 on an unknown command
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
