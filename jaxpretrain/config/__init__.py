"""Configs: Python files with presets, NeMo recipe YAML, command-line overrides, `--help`, and the
effective config a run writes. Nothing here imports jax, so parsing and `--help` stay fast.

    parsed = cli.parse(argv, prog=..., description=...)   # --config SPEC [--config.a.b=v ...]
    cfg = finalize(parsed.cfg)                            # validation fields inherited from dataset
"""

from __future__ import annotations

from jaxpretrain.config.sections import INHERITED_VALIDATION_FIELDS


def finalize(cfg):
    """Fill what the config leaves to be derived: every unset (None) validation field takes the train
    section's value (the seed's two sections name the same files). Returns `cfg`."""
    with cfg.unlocked():
        for name in INHERITED_VALIDATION_FIELDS:
            if cfg.validation_dataset.get(name) is None and name in cfg.dataset:
                value = cfg.dataset[name]
                if name in cfg.validation_dataset:
                    del cfg.validation_dataset[name]
                cfg.validation_dataset[name] = value
    return cfg
