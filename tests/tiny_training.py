"""The real train step of a tiny GPT-2 (vocab 512, seq 16, global batch 4) on one CPU device, in-process."""

from __future__ import annotations

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_training(local_batch_size: int = 2, max_steps: int | None = None, lr: float | None = None, warmup: int | None = None,
                  weight_decay: float | None = None):
    """(cfg, mesh, plan, training, batch): `setup.build_training` of the `tiny` preset shrunk to one
    layer; `lr` also sets init_lr to lr / 10. The batch is random token ids, the same every call."""
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import gpt2 as presets

    from jaxpretrain import parallel
    from jaxpretrain.train import setup

    cfg = presets.get_config("tiny")
    with cfg.unlocked():
        cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head, cfg.model.n_positions = 1, 32, 2, 32
        cfg.model.vocab_size = 512
        cfg.dataset.seq_length = 16
        cfg.step_scheduler.global_batch_size, cfg.step_scheduler.local_batch_size = 4, local_batch_size
        cfg.distributed.dp_size = 1
        if max_steps is not None:
            cfg.step_scheduler.max_steps = max_steps
        if lr is not None:
            cfg.optimizer.lr, cfg.lr_scheduler.init_lr = lr, lr / 10
        if warmup is not None:
            cfg.lr_scheduler.lr_warmup_steps = warmup
        if weight_decay is not None:
            cfg.optimizer.weight_decay = weight_decay
    mesh = setup.make_mesh(cfg)
    plan = setup.plan_batches(cfg, parallel.data_parallel_size(mesh))
    t = setup.build_training(cfg, mesh, plan)
    ids = np.random.default_rng(0).integers(0, 512, (4, 17)).astype(np.int32)
    batch = parallel.make_global_batch({"input_ids": ids[:, :-1], "labels": ids[:, 1:]}, mesh)
    return cfg, mesh, plan, t, batch
