"""`python -m jaxpretrain.plot`: a real tiny training run's metrics -> PNG, read back pixel by pixel;
the resume (duplicate step) and tokens-seen logic on hand-written JSONL."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from test_train import as_flags, python, tiny_overrides

pytest.importorskip("matplotlib")  # the test extra installs it; the plot is an optional extra


def colour(i):
    import matplotlib

    return np.array(matplotlib.colormaps["tab20"].colors[i])


TRAIN, VAL = colour(1), colour(0)  # the first run's colours: train light, validation dark
TRAIN_2, VAL_2 = colour(3), colour(2)
REFERENCE = np.array([0xCC, 0x00, 0xCC]) / 255


def pixels(png, rgb, tol=0.02):
    import matplotlib.image

    img = matplotlib.image.imread(png)[..., :3]
    return int(np.all(np.abs(img - rgb) < tol, axis=-1).sum())


def plot(*args):
    return python("-m", "jaxpretrain.plot", *map(str, args))


@pytest.fixture(scope="module")
def tiny_run(corpus, tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("plot_run") / "ckpt")
    overrides = tiny_overrides(corpus, ckpt, **{
        "step_scheduler.max_steps": 6, "step_scheduler.val_every_steps": 2, "step_scheduler.ckpt_every_steps": 6,
        "model.dropout": 0.0,
    })
    r = python("-m", "jaxpretrain.train", *as_flags(overrides))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return ckpt


def test_real_run_gives_a_png_with_both_curves(tiny_run, tmp_path):
    png = tmp_path / "loss.png"
    r = plot(tiny_run, "--output", png)
    assert r.returncode == 0, r.stderr
    assert "6 train steps, 3 validations" in r.stdout and "1.536K tokens" in r.stdout  # 6 x 8 x 32 label tokens
    assert pixels(png, TRAIN) > 100 and pixels(png, VAL) > 100
    assert os.path.isfile(os.path.join(tiny_run, "logs", "config.yaml"))
    assert pixels(png, REFERENCE) == 0  # the run's config.yaml is a 2-layer GPT-2: no llm.c reference

    # Two runs overlaid under the names given: the run and a copy of its logs one nat higher.
    other = tmp_path / "other"
    other.mkdir()
    for name, key in (("train.jsonl", "loss"), ("validation.jsonl", "val_loss")):
        records = [json.loads(line) for line in open(os.path.join(tiny_run, "logs", name))]
        (other / name).write_text("".join(json.dumps({**r, key: r[key] + 1.0}) + "\n" for r in records))
    both = tmp_path / "both.png"
    r = plot(tiny_run, other, "--labels", "first,second", "--output", both)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("first: ") and "\nsecond: " in r.stdout
    assert min(pixels(both, c) for c in (TRAIN, VAL, TRAIN_2, VAL_2)) > 100


def effective_config(spec, path):
    """The config.yaml the train CLI writes for `spec`, written without training."""
    from jaxpretrain.config import effective, files

    loaded = files.load(spec)
    effective.write_effective(loaded, loaded.cfg, str(path))


def test_llmc_reference_for_the_124m_recipe_only(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(os.path.join(tiny_run, "logs"), run / "logs")
    config = run / "logs" / "config.yaml"
    png = tmp_path / "ref.png"
    for spec in ("configs/gpt2.py:124m", "configs/megatron_pretrain_gpt2.yaml"):  # the preset, the seed's YAML
        effective_config(spec, config)
        r = plot(run, "--output", png)
        assert r.returncode == 0, r.stderr
        assert "with llm.c's reference" in r.stdout, spec
        assert pixels(png, REFERENCE) > 50 and pixels(png, TRAIN) > 20 and pixels(png, VAL) > 20
    r = plot(run, "--output", png, "--reference", "none")
    assert r.returncode == 0 and pixels(png, REFERENCE) == 0

    effective_config("configs/gpt2.py:tiny", config)
    r = plot(run, "--output", png)
    assert r.returncode == 0 and pixels(png, REFERENCE) == 0  # a tiny GPT-2 is not the recipe
    r = plot(run, "--output", png, "--reference", "llmc")
    assert r.returncode == 0 and pixels(png, REFERENCE) > 50


def test_resumed_steps_last_record_wins_and_tokens_accumulate(tmp_path):
    from jaxpretrain.plot import load_run

    train = [
        {"step": 1, "loss": 10.0, "num_label_tokens": 100},
        {"step": 2, "loss": 9.0, "num_label_tokens": 120},
        {"step": 3, "loss": 8.0, "num_label_tokens": 999},  # lost with the preemption: replaced below
        {"step": 4, "loss": 7.0, "num_label_tokens": 999},
        # resumed from the step-2 checkpoint
        {"step": 3, "loss": 7.5, "num_label_tokens": 130},
        {"step": 4, "loss": 6.5, "num_label_tokens": 140},
        {"step": 5, "loss": 6.0, "num_label_tokens": 150},
    ]
    val = [{"step": 2, "val_loss": 8.5, "num_label_tokens": 64}, {"step": 4, "val_loss": 7.2, "num_label_tokens": 64},
           {"step": 4, "val_loss": 7.0, "num_label_tokens": 64}]
    logs = tmp_path / "ckpt" / "logs"
    logs.mkdir(parents=True)
    (logs / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train) + '{"step": 6, "lo')  # killed mid-line
    (logs / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    run = load_run(str(tmp_path / "ckpt"))
    assert run.name == "ckpt"
    assert run.train_tokens == [100, 220, 350, 490, 640]
    assert run.train_loss == [10.0, 9.0, 7.5, 6.5, 6.0]
    assert run.val_tokens == [220, 490]
    assert run.val_loss == [8.5, 7.0]
    assert not run.gaps


def test_bad_input_is_one_line_exit_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = plot(empty, "--output", tmp_path / "x.png")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "holds no train.jsonl" in r.stderr, r.stderr

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"step": 1, "loss": 3.0, "num_label_tokens": 8}\nnot json\n{"step": 3, "loss": 2.0}\n')
    r = plot(bad, "--output", tmp_path / "bad.png")  # skipped and counted: the curve has steps 1 and 3
    assert r.returncode == 0, r.stderr
    assert f"note: {bad / 'train.jsonl'}: 1 malformed line skipped (not a metrics record with `step` and `loss`; first: line 2)" in r.stderr
    assert os.path.getsize(tmp_path / "bad.png") > 0
    os.remove(tmp_path / "bad.png")
    r = plot(bad, "--output", tmp_path)
    assert r.returncode == 2 and "is a directory; name the image file" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = plot(empty, bad, "--labels", "one", "--output", tmp_path / "x.png")
    assert r.returncode == 2 and "--labels: 1 names for 2 run directories" in r.stderr, r.stderr
    assert not (tmp_path / "x.png").exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".plot-")]

    # Without matplotlib (blocked here): the install hint, exit 2.
    good = tmp_path / "good"
    good.mkdir()
    (good / "train.jsonl").write_text('{"step": 1, "loss": 3.0, "num_label_tokens": 8}\n')
    blocked = ("import sys; sys.modules['matplotlib'] = None; from jaxpretrain.errors import run_cli; "
               "from jaxpretrain.plot import main; run_cli(main)")
    r = python("-c", blocked, str(good), "--output", str(tmp_path / "x.png"))
    assert r.returncode == 2 and 'pip install "jaxpretrain[plot]"' in r.stderr and "Traceback" not in r.stderr, r.stderr
