"""`jaxpretrain COMMAND ...` (or `python -m jaxpretrain COMMAND ...`): every CLI of the package under
one name, as NeMo Automodel's `automodel`; `jaxpretrain COMMAND --help` is that CLI's own help, the
same as `python -m jaxpretrain.<module> --help`. No jax import until a command runs."""

from __future__ import annotations

import importlib
import sys

from jaxpretrain.errors import UserError, run_cli

# command -> (module whose main(argv) it runs, what it does). Kept here rather than read from each
# module's docstring: importing the modules for `--help` would import jax.
COMMANDS = {
    "train": ("jaxpretrain.train.__main__", "pretrain from Megatron .bin/.idx files (a Python config or NeMo's recipe YAML)"),
    "preprocess": ("jaxpretrain.preprocess", "JSONL/parquet -> Megatron .bin/.idx (megatron-core's preprocess_data.py flags)"),
    "export": ("jaxpretrain.export", "a training checkpoint -> a Hugging Face directory (safetensors)"),
    "eval": ("jaxpretrain.eval", "HellaSwag accuracy or validation loss of a checkpoint or HF directory"),
    "generate": ("jaxpretrain.generate", "sample a continuation with a KV cache"),
    "bench": ("jaxpretrain.bench", "compile time, tokens/s, MFU and memory of the real train step"),
    "plot": ("jaxpretrain.plot", "loss curves of runs (train.jsonl / validation.jsonl) as a PNG"),
    "fineweb": ("jaxpretrain.data.fineweb", "FineWeb-Edu 10BT parquet -> JSONL, in order and shuffled (the seed's data preparation)"),
    "corpus": ("jaxpretrain.data.stdlib_corpus", "write the embedded default corpus (CPython's stdlib) as JSONL"),
}


def usage() -> str:
    lines = ["usage: jaxpretrain COMMAND [ARGS ...]   (or python -m jaxpretrain COMMAND ...)", "", "commands:"]
    lines += [f"  {name:<11} {what}" for name, (_, what) in COMMANDS.items()]
    lines += ["", "jaxpretrain COMMAND --help shows a command's own flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        raise UserError(f"{name}: unknown command (commands: {', '.join(COMMANDS)}; jaxpretrain --help)")
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)


def entry() -> None:
    """The `jaxpretrain` console script."""
    run_cli(main)


if __name__ == "__main__":
    entry()
