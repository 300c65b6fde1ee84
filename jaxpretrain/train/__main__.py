"""`python -m jaxpretrain.train --config configs/gpt2.py[:preset] [--config.section.field=value ...]`."""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from jaxpretrain.errors import UserError, run_cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe config file, e.g. configs/gpt2.py:tiny", lock_config=True)


def parse_config(argv: list[str]):
    """Parses --config and its overrides; any mistake becomes one UserError line, not absl's traceback."""
    try:
        flags.FLAGS(argv)
    except flags.Error as e:
        first = str(e).strip().splitlines()
        raise UserError(first[0] if first else "bad command line") from None
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections reports an override of a field the config lacks as a bare AttributeError.
        name = str(e).strip("\"' ")
        flag = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and name in a), "--config")
        raise UserError(f"{flag}: {name!r} is not a field of the config (see configs/gpt2.py)") from None
    if _CONFIG.value is None:
        raise UserError("--config: required, e.g. --config configs/gpt2.py:tiny")
    return _CONFIG.value


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config([sys.argv[0]] + list(sys.argv[1:] if argv is None else argv))
    from jaxpretrain.train.loop import run  # after parsing: --help and bad flags answer without importing jax

    return run(cfg)


if __name__ == "__main__":
    run_cli(main)
