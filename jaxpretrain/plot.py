"""`python -m jaxpretrain.plot RUN_DIR [RUN_DIR ...] --output loss.png`: loss curves against tokens seen.

A RUN_DIR is a metrics directory (`train.jsonl` / `validation.jsonl`, what the train CLI writes to
`<checkpoint_dir>/logs/`) or a checkpoint directory holding `logs/`. Train and validation loss of every
run are drawn against the tokens seen, several runs overlaid. A resumed run appends to the same files,
so a step can appear more than once: its last record wins. Tokens seen at step s are the sum of the
train records' `num_label_tokens` over steps <= s.

For the seed's 124M recipe (GPT-2 124M, read from the run's `config.yaml`) llm.c's reference is drawn
too: validation loss ~3.28 after 10B tokens, measured on FineWeb, not FineWeb-Edu (the plot says so;
FineWeb-Edu losses run lower, so the point is a landmark, not a target). matplotlib is an optional
extra: `pip install "jaxpretrain[plot]"`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field

from jaxpretrain.atomic import usual_mode
from jaxpretrain.errors import UserError, run_cli

# llm.c's GPT-2 124M after 10B tokens of FineWeb (karpathy/llm.c discussion #481; modded-nanogpt's
# README quotes 3.2847): validation loss ~3.28 on FineWeb's validation split.
LLMC_TOKENS = 10e9
LLMC_VAL_LOSS = 3.28
LLMC_LABEL = "llm.c GPT-2 124M: val 3.28 at 10B tokens (FineWeb, not FineWeb-Edu)"
REFERENCE_COLOR = "#cc00cc"  # not among the run colours (tab20)
GPT2_124M = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}
GPT2_NAMES = ("gpt2", "openai-community/gpt2")


@dataclass
class RunCurves:
    name: str
    train_tokens: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_tokens: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    config: dict | None = None
    gaps: bool = False  # train steps missing: tokens seen are undercounted after the gap


# -- reading a run -----------------------------------------------------------------------------------


def metrics_dir(run_dir: str) -> str:
    """The directory holding the JSONL files: RUN_DIR itself or RUN_DIR/logs."""
    for d in (run_dir, os.path.join(run_dir, "logs")):
        if any(os.path.isfile(os.path.join(d, f)) for f in ("train.jsonl", "validation.jsonl")):
            return d
    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir}: no such directory")
    raise UserError(f"{run_dir}: holds no train.jsonl or validation.jsonl (nor does {os.path.join(run_dir, 'logs')})")


def read_records(path: str, value_key: str) -> dict[int, dict]:
    """The records of one JSONL file by step, the last record of a step winning (a resumed run appends).

    A last line without its newline is a write cut short (the run was killed mid-line) and is skipped
    silently; any other unreadable line is skipped and counted in one stderr note naming the first.
    """
    records: dict[int, dict] = {}
    if not os.path.exists(path):
        return records
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    skipped = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
            float(record[value_key])
        except (ValueError, KeyError, TypeError):
            if not (number == len(lines) and not line.endswith("\n")):
                skipped.append(number)
            continue
        records[step] = record
    if skipped:
        print(f"note: {path}: {len(skipped)} malformed line{'s' * (len(skipped) > 1)} skipped (not a metrics record "
              f"with `step` and `{value_key}`; first: line {skipped[0]})", file=sys.stderr, flush=True)
    return records


def tokens_seen(train: dict[int, dict]) -> dict[int, int]:
    """Cumulative label tokens after each logged train step."""
    seen, total = {}, 0
    for step in sorted(train):
        total += int(train[step].get("num_label_tokens", 0))
        seen[step] = total
    return seen


def read_config(mdir: str) -> dict | None:
    """The effective config the train CLI writes as YAML next to the metrics or one level up."""
    import yaml

    for d in (mdir, os.path.dirname(os.path.abspath(mdir))):
        path = os.path.join(d, "config.yaml")
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    config = yaml.safe_load(f)
            except (OSError, yaml.YAMLError) as e:
                raise UserError(f"{path}: not readable YAML ({str(e).splitlines()[0]})") from None
            return config if isinstance(config, dict) else None
    return None


def load_run(run_dir: str, name: str | None = None) -> RunCurves:
    mdir = metrics_dir(run_dir)
    train = read_records(os.path.join(mdir, "train.jsonl"), "loss")
    val = read_records(os.path.join(mdir, "validation.jsonl"), "val_loss")
    if not train and not val:
        raise UserError(f"{mdir}: the metrics files hold no records")
    if name is None:
        path = os.path.abspath(run_dir if os.path.abspath(mdir) == os.path.abspath(run_dir) else mdir)
        name = os.path.basename(os.path.dirname(path)) if os.path.basename(path) == "logs" else os.path.basename(path)
    seen = tokens_seen(train)
    run = RunCurves(name=name, config=read_config(mdir))
    steps = sorted(train)
    run.gaps = bool(steps) and steps != list(range(1, steps[-1] + 1))
    for step in steps:
        run.train_tokens.append(seen[step])
        run.train_loss.append(float(train[step]["loss"]))
    for step in sorted(val):
        logged = [s for s in steps if s <= step]
        run.val_tokens.append(seen[logged[-1]] if logged else 0)
        run.val_loss.append(float(val[step]["val_loss"]))
    return run


def is_gpt2_124m(config: dict | None) -> bool:
    """The seed's recipe: the GPT-2 config with its shape fields left unset (null) or at GPT-2 124M's."""
    model = (config or {}).get("model") or {}
    if not isinstance(model, dict) or model.get("pretrained_model_name_or_path") not in GPT2_NAMES:
        return False
    return all(model.get(k) in (None, v) for k, v in GPT2_124M.items())


# -- drawing -------------------------------------------------------------------------------------------


def _format_tokens(x: float, _pos=None) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:g}{suffix}"
    return f"{x:g}"


def plot_runs(runs: list[RunCurves], output: str, *, reference: str = "auto", ylim: tuple[float, float] | None = None) -> bool:
    """Draw `runs` into `output` (written atomically; the format from its extension). Returns whether
    llm.c's reference was drawn."""
    try:
        import matplotlib
    except ImportError:
        raise UserError('matplotlib: not installed; the plot needs it: pip install "jaxpretrain[plot]"') from None
    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    draw_reference = reference == "llmc" or (reference == "auto" and any(is_gpt2_124m(r.config) for r in runs))
    palette = plt.get_cmap("tab20").colors  # pairs (dark, light): validation dark, train light
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=100)
    for i, run in enumerate(runs):
        dark, light = palette[(2 * i) % 20], palette[(2 * i + 1) % 20]
        if run.train_loss:
            ax.plot(run.train_tokens, run.train_loss, color=light, linewidth=1.5, label=f"{run.name} train")
        if run.val_loss:
            ax.plot(run.val_tokens, run.val_loss, color=dark, linewidth=2.5, marker="o", markersize=5, label=f"{run.name} validation")
    if draw_reference:
        ax.axhline(LLMC_VAL_LOSS, color=REFERENCE_COLOR, linewidth=1.5, linestyle=":")
        ax.plot([LLMC_TOKENS], [LLMC_VAL_LOSS], color=REFERENCE_COLOR, marker="*", markersize=14, linestyle="none", label=LLMC_LABEL)
    ax.xaxis.set_major_formatter(FuncFormatter(_format_tokens))
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (cross-entropy, nats per token)")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()

    out = os.path.abspath(output)
    fmt = os.path.splitext(out)[1].lstrip(".").lower() or "png"
    if os.path.isdir(out):
        plt.close(fig)
        raise UserError(f"--output {output}: is a directory; name the image file (e.g. {os.path.join(output, 'loss.png')})")
    if fmt not in fig.canvas.get_supported_filetypes():
        plt.close(fig)
        raise UserError(f"--output {output}: unknown image format .{fmt} (use .png, .pdf or .svg)")
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".plot-", suffix=f".{fmt}", dir=os.path.dirname(out))
        os.close(fd)
    except OSError as e:
        plt.close(fig)
        raise UserError(f"--output {output}: cannot write here ({e.strerror})") from None
    try:
        fig.savefig(tmp, format=fmt)
        usual_mode(tmp)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return draw_reference


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxpretrain.plot", description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="metrics directory, or checkpoint directory holding logs/")
    p.add_argument("--output", required=True, help="image to write (.png, .pdf, .svg)")
    p.add_argument("--labels", default=None, help="comma-separated legend names, one per RUN_DIR (default: directory names)")
    p.add_argument("--reference", choices=("auto", "llmc", "none"), default="auto",
                   help="llm.c's 124M reference: auto = when a run is the 124m recipe (its config.yaml)")
    p.add_argument("--ylim", default=None, help="y range as LO,HI (default: all of it)")
    a = p.parse_args(argv)
    labels = a.labels.split(",") if a.labels else [None] * len(a.run_dirs)
    if len(labels) != len(a.run_dirs):
        raise UserError(f"--labels: {len(labels)} names for {len(a.run_dirs)} run directories")
    ylim = None
    if a.ylim:
        try:
            lo, hi = (float(v) for v in a.ylim.split(","))
        except ValueError:
            raise UserError(f"--ylim: expected LO,HI, got {a.ylim!r}") from None
        ylim = (lo, hi)
    runs = [load_run(d, name) for d, name in zip(a.run_dirs, labels)]
    drew_reference = plot_runs(runs, a.output, reference=a.reference, ylim=ylim)
    for run in runs:
        last_val = f", last validation loss {run.val_loss[-1]:.4f}" if run.val_loss else ""
        seen = run.train_tokens[-1] if run.train_tokens else 0
        print(f"{run.name}: {len(run.train_loss)} train steps, {len(run.val_loss)} validations, "
              f"{_format_tokens(seen)} tokens{last_val}")
        if run.gaps:
            print(f"warning: {run.name}: train steps are missing from its log; tokens seen after a gap are undercounted",
                  file=sys.stderr)
    print(f"wrote {os.path.abspath(a.output)}" + (" (with llm.c's reference)" if drew_reference else ""))
    return 0


if __name__ == "__main__":
    run_cli(main)
