"""Which steps validate and checkpoint, against NeMo Automodel's own StepScheduler.

A recipe YAML's step_scheduler section goes through our config layer (so the keys it leaves out take
our filled-in defaults) into train/cadence.py; the same section goes to NeMo's
`StepSchedulerConfig(**section).build(...)` (local_batch_size as NeMo's recipe passes it), whose
scheduler iterates a dataloader of the same epoch length. Every step's (validate, checkpoint, log to
W&B) must agree, SIGTERM's step included, and both must end at the same step.
"""

from __future__ import annotations

import pytest
import yaml

pytest.importorskip("nemo_automodel")

HEAD = {"model": {"config": {"pretrained_model_name_or_path": "gpt2"}},
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 3.0e-4}}

CASES = {
    # Only max_steps: NeMo's defaults (global batch 32 of micro-batches 1, checkpoint every 100, no
    # periodic validation, 10 epochs) fill the rest.
    "nemo-defaults": ({"max_steps": 260}, 500, None),
    "seed-like": ({"global_batch_size": 8, "local_batch_size": 4, "ckpt_every_steps": 10, "val_every_steps": 4,
                   "num_epochs": 1, "max_steps": 30, "log_remote_every_steps": 4}, 50, 16),
    # The epochs run out (3 x 9 steps) before max_steps; epoch ends checkpoint; no checkpoint validation.
    "epochs-end-first": ({"global_batch_size": 4, "local_batch_size": 2, "ckpt_every_steps": 7, "val_every_steps": 5,
                          "num_epochs": 3, "max_steps": 100, "validate_on_checkpoint": False}, 9, 12),
    "no-epoch-checkpoints": ({"global_batch_size": 4, "local_batch_size": 4, "ckpt_every_steps": 6, "num_epochs": 2,
                              "max_steps": 40, "save_checkpoint_every_epoch": False}, 11, 20),
    # No max_steps: NeMo's full-epoch training, num_epochs x the epoch's steps (3 x 13).
    "no-max-steps": ({"global_batch_size": 4, "local_batch_size": 2, "ckpt_every_steps": 10, "val_every_steps": 4,
                      "num_epochs": 3, "log_remote_every_steps": 5}, 13, None),
}


@pytest.mark.parametrize("section, epoch_len, sigterm_step", CASES.values(), ids=CASES.keys())
def test_validation_and_checkpoint_steps_are_nemos(tmp_path, section, epoch_len, sigterm_step):
    from nemo_automodel.components.training.step_scheduler import StepSchedulerConfig

    from jaxpretrain.config import cli
    from jaxpretrain.train.cadence import Cadence, total_steps

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(HEAD | {"step_scheduler": section}))
    ss = cli.parse(["--config", str(path)], prog="train", description="").cfg.step_scheduler

    nemo_section = {k: v for k, v in section.items() if k != "local_batch_size"}
    local = section.get("local_batch_size", 1)
    grad_acc = ss.global_batch_size // local
    nemo = StepSchedulerConfig(**nemo_section, preemption_signal=None).build(
        dataloader=list(range(epoch_len * grad_acc)), dp_group_size=1, local_batch_size=local)
    assert nemo.epoch_len == epoch_len
    theirs = []
    for epoch in nemo.epochs:
        nemo.set_epoch(epoch)
        for _ in nemo:
            step = nemo.step + 1  # NeMo counts from 0 before its increment
            if step == sigterm_step:
                nemo.sigterm_flag = True  # what its signal handler sets
            theirs.append((step, nemo.is_val_step, nemo.is_ckpt_step, nemo.is_remote_logging_step))
        if nemo.sigterm_flag:
            break

    total = total_steps(ss.max_steps, epoch_len, ss.num_epochs)  # what train/setup.py runs
    assert total == min(nemo.max_steps, nemo.num_epochs * epoch_len)
    cadence = Cadence.from_config(ss, total_steps=total, steps_per_epoch=epoch_len, has_validation=True)
    ours = []
    for step in range(1, total + 1):
        stopping = step == sigterm_step
        ours.append((step, cadence.validate(step, stopping), cadence.checkpoint(step, stopping), cadence.log_remote(step)))
        if stopping:
            break
    assert ours == theirs
    assert any(v for _, v, _, _ in ours) and any(c for _, _, c, _ in ours)  # the cases exercise both
