"""The command line of `train` and `bench`: `--config SPEC`, `--config.section.field=value`, NeMo's
`--section.key VALUE` (config/nemo_yaml.py), the CLI's own flags, and `--help`, which lists every
field with its default and its comment. No jax import."""

from __future__ import annotations

import dataclasses
import os
import sys
import textwrap

from jaxpretrain.config import docs as docs_lib
from jaxpretrain.config import nemo_yaml
from jaxpretrain.config.files import DEFAULT_CONFIG, REPO_ROOT, Loaded, load, load_module, presets_of, resolve_path, split_spec
from jaxpretrain.config.overrides import leaf_paths, set_field
from jaxpretrain.errors import UserError

SECTION_ORDER = (
    "model", "dataset", "validation_dataset", "step_scheduler", "rng", "checkpoint", "distributed",
    "loss_fn", "optimizer", "lr_scheduler", "eval", "wandb", "logging",
)


@dataclasses.dataclass(frozen=True)
class Flag:
    """One of a CLI's own flags (beside --config): `--name VALUE`, or a switch when type is bool."""

    name: str
    type: type
    default: object
    help: str


@dataclasses.dataclass
class Parsed:
    loaded: Loaded
    flags: dict  # the CLI's own flags, by name (dashes as underscores)

    @property
    def cfg(self):
        return self.loaded.cfg


def parse(argv: list[str], *, prog: str, description: str, flags: tuple[Flag, ...] = ()) -> Parsed:
    """Parse a train/bench command line; `--help` prints the help and exits 0; mistakes are UserErrors."""
    own = {f"--{f.name}": f for f in flags}
    spec, overrides, nemo, values = None, [], [], {f.name.replace("-", "_"): f.default for f in flags}
    i, want_help = 0, False
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if arg in ("-h", "--help", "-help", "--helpfull"):
            want_help = True
        elif name in ("--config", "-c"):  # -c: NeMo's short form
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UserError("--config: needs a file, e.g. --config configs/gpt2.py:tiny")
                value = argv[i]
            spec = value
        elif name.startswith("--config."):
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UserError(f"{name}: needs a value ({name}=VALUE)")
                value = argv[i]
            overrides.append((name, value))
        elif nemo_yaml.is_nemo_flag(name):  # NeMo's `--section.key VALUE`: a key of the --config file
            if not eq:
                value, i = nemo_yaml.value_of(argv, i)
            nemo.append((name, value))
        elif name in own:
            flag = own[name]
            if flag.type is bool and not eq:
                value = "true"
            elif not eq:
                i += 1
                if i >= len(argv):
                    raise UserError(f"{name}: needs a value")
                value = argv[i]
            values[flag.name.replace("-", "_")] = _flag_value(flag, value)
        else:
            known = ", ".join(["--config", "--config.SECTION.FIELD=VALUE", "--SECTION.KEY VALUE (NeMo's)", *own, "--help"])
            raise UserError(f"{arg}: unknown flag (flags: {known})")
        i += 1
    if want_help:
        print(help_text(prog, description, spec, flags))
        raise SystemExit(0)
    if spec is None:
        raise UserError(f"--config: required, e.g. --config {DEFAULT_CONFIG}:tiny (see --help)")
    loaded = load(spec, tuple(overrides), tuple(nemo))
    for flag, value in overrides:
        set_field(loaded.cfg, loaded.types, flag[len("--config."):], value, flag=flag)
    return Parsed(loaded, values)


def _flag_value(flag: Flag, raw: str):
    if flag.type is bool:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise UserError(f"--{flag.name}: {raw!r} is not true or false")
    try:
        return flag.type(raw)
    except ValueError:
        raise UserError(f"--{flag.name}: {raw!r} is not a {flag.type.__name__}") from None


# ------------------------------------------------------------------------------------------- help


def help_text(prog: str, description: str, spec: str | None, flags: tuple[Flag, ...]) -> str:
    spec = spec or DEFAULT_CONFIG
    path, preset = split_spec(spec)
    if not path.endswith(".py"):  # a YAML's fields are those of the family's Python config
        path, preset = DEFAULT_CONFIG, None
    try:
        config_path = resolve_path(path)
    except UserError:
        config_path = resolve_path(DEFAULT_CONFIG)
    module = load_module(config_path)
    presets = presets_of(module)
    cfg = module.get_config(preset)
    rel = os.path.relpath(config_path, REPO_ROOT) if config_path.startswith(REPO_ROOT) else config_path
    out = [
        f"usage: {prog} --config CONFIG [--config.SECTION.FIELD=VALUE ...]" + "".join(f" [--{f.name}{'' if f.type is bool else ' ' + f.name.upper().replace('-', '_')}]" for f in flags),
        "",
        description,
        "",
        "CONFIG is a Python config with an optional preset (configs/gpt2.py:tiny), NeMo Automodel's recipe YAML",
        "(the seed's megatron_pretrain_gpt2.yaml, as is), or the config.yaml a run writes to its run directory.",
        "Any field below can be overridden: --config.step_scheduler.max_steps=100; `none` unsets a field;",
        "lists and dicts are JSON: --config.dataset.paths='[\"30\", \"prefix_0\", \"70\", \"prefix_1\"]'.",
        "NeMo's own overrides work too, -c for --config: --SECTION.KEY VALUE sets a key of the CONFIG file",
        "itself (a recipe YAML's: --model.config.n_layer 6 --clip_grad_norm.max_norm 0.5), before the",
        "--config.* overrides; a recipe YAML's ${VAR} and ${VAR,default} read the environment, as in NeMo.",
    ]
    if flags:
        out += ["", "flags:"]
        for f in flags:
            default = "" if f.type is bool else f" (default: {f.default})"
            out.append(f"  --{f.name:<14} {f.help}{default}")
    out += ["", f"presets of {rel}:"]
    for name, what in presets.items():
        out.append(f"  {name:<8} {what}")
    others = sorted(p for p in os.listdir(os.path.join(REPO_ROOT, "configs")) if p.endswith(".py")) if os.path.isdir(os.path.join(REPO_ROOT, "configs")) else []
    others = [f"configs/{p}" for p in others if f"configs/{p}" != rel]
    if others:
        out.append(f"other configs: {', '.join(others)} (--config FILE --help lists theirs)")
    shown = f"{rel}:{preset}" if preset else f"{rel} (default preset)"
    out += ["", f"fields of {shown}, by section (name = default: what it does):"]
    out += field_lines(cfg, config_path)
    return "\n".join(out)


def field_lines(cfg, config_path: str) -> list[str]:
    from jaxpretrain.config import sections

    docs = docs_lib.field_docs(open(sections.__file__).read())
    family_docs = docs_lib.field_docs(open(config_path).read())
    paths = leaf_paths(cfg)
    order = {s: i for i, s in enumerate(SECTION_ORDER)}
    by_section: dict[str, list[str]] = {}
    for p in paths:
        by_section.setdefault(p.split(".", 1)[0], []).append(p)
    lines = []
    for section in sorted(by_section, key=lambda s: (order.get(s, len(order)), s)):
        lines.append(f"  [{section}]")
        def position(p):
            found = docs_lib.lookup(family_docs, p) if section == "model" else docs_lib.lookup(docs, p)
            return found[1] if found else 10**6
        for p in sorted(by_section[section], key=position):
            found = (docs_lib.lookup(family_docs, p) or docs_lib.lookup(docs, p)) if section == "model" else (docs_lib.lookup(docs, p) or docs_lib.lookup(family_docs, p))
            *parents, name = p.split(".")
            node = cfg
            for part in parents:
                node = node[part]
            lines.append(f"    {p} = {_show(node[name])}")
            if found:
                lines += textwrap.wrap(found[0], width=110, initial_indent="        ", subsequent_indent="        ")
    return lines


def _show(value) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, tuple):
        return repr(list(value))
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def print_notes(loaded: Loaded) -> None:
    """One line for the recipe keys that were accepted but do nothing in JAX, one for the values it
    left out that were filled in as NeMo would."""
    if loaded.notes:
        print(f"note: {os.path.basename(loaded.source)}: accepted, no effect in JAX: {', '.join(loaded.notes)}", file=sys.stderr, flush=True)
    for line in loaded.filled:
        print(f"note: {os.path.basename(loaded.source)}: {line}", file=sys.stderr, flush=True)
