"""`python -m jaxpretrain.train --config configs/gpt2.py[:preset] [--config.section.field=value ...]`.

Pretrains a model from Megatron `.bin/.idx` token files as the seed's NeMo Automodel recipe does;
`--config` also takes that recipe's YAML as is. Rerunning the same command resumes from the newest
complete checkpoint; SIGTERM saves a checkpoint and exits. `--help` lists every config field.

Exit status: 0 finished (max_steps reached); 75 stopped by SIGTERM after saving a checkpoint (rerun
to resume: scripts/slurm/train.sbatch requeues on it); 2 bad input (one `error:` line); 1 a failure,
including a lost peer process in a multi-process run.
"""

from __future__ import annotations

import sys

from jaxpretrain.errors import run_cli

DESCRIPTION = (
    "Pretrain a language model from Megatron .bin/.idx token files (NeMo Automodel's recipe in JAX). Rerunning\n"
    "the same command resumes from the newest complete checkpoint; SIGTERM saves one and exits.\n"
    "Exit status: 0 finished; 75 stopped by SIGTERM after saving (rerun to resume); 2 bad input; 1 a failure."
)


def parse_config(argv: list[str], *, prog: str = "python -m jaxpretrain.train", description: str = DESCRIPTION, flags=()):
    """The command line as a finished config (recipe YAML mapped, overrides applied, validation
    fields inherited); `--help` prints and exits; mistakes are one UserError line."""
    from jaxpretrain.config import cli, finalize

    parsed = cli.parse(argv, prog=prog, description=description, flags=flags)
    cli.print_notes(parsed.loaded)
    finalize(parsed.cfg)
    return parsed


def main(argv: list[str] | None = None) -> int:
    parsed = parse_config(list(sys.argv[1:] if argv is None else argv))
    from jaxpretrain.train import precheck

    precheck.check(parsed.cfg)  # schedule and optimizer mistakes answer before jax is imported
    from jaxpretrain import xla_env

    xla_env.configure()  # GPU XLA flags under the user's XLA_FLAGS, before jax starts its backend
    from jaxpretrain.train.loop import run  # after parsing: --help and bad flags answer without importing jax

    return run(parsed.cfg, parsed.loaded)


if __name__ == "__main__":
    run_cli(main)
