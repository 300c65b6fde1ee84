"""HellaSwag scoring (jaxpretrain/evaluation/hellaswag.py and `python -m jaxpretrain.eval`).

(a) items whose answer is known by construction, through a bigram "model" whose losses are
    written down exactly; (b) a random small GPT-2 against build-nanogpt's scoring done with
    transformers' torch GPT2LMHeadModel on the saved directory; (c) the CLI, from an HF directory and
    from a training checkpoint; bad files; (d) the sharded path (a 2x2 CPU mesh) against one device.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import run_module, word_level_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINAL = re.compile(r"^hellaswag acc (\d\.\d{4}) acc_norm (\d\.\d{4}) \((\d+) items\)$")


# -- (a) answers known by construction ------------------------------------------------------------


def bigram_logits_fn(table, calls=None):
    """logits[b, t] = table[tokens[b, t]]: a model whose next-token log-probabilities we chose."""
    import jax.numpy as jnp

    table = jnp.asarray(table, jnp.float32)

    def logits_fn(ids):
        if calls is not None:
            calls.append(tuple(ids.shape))
        return table[ids]

    return logits_fn


def bigram_table(tok, probs: dict[tuple[str, str], float], vocab: int = 100) -> np.ndarray:
    """Log-probabilities log p(next | prev): the given pairs, the rest of each row spread evenly."""
    ids = tok.convert_tokens_to_ids
    p = np.zeros((vocab, vocab))
    for (prev, nxt), prob in probs.items():
        p[ids(prev), ids(nxt)] = prob
    for row in p:
        free = row == 0
        row[free] = (1.0 - row.sum()) / free.sum()
    return np.log(p)


def test_known_answers_and_acc_vs_acc_norm():
    from jaxpretrain.evaluation import hellaswag as hs

    tok = word_level_tokenizer()
    e = math.exp
    table = bigram_table(tok, {
        ("w2", "w3"): 0.9,                                   # item 0: after w2, w3 is near certain
        ("w10", "w11"): e(-1.0), ("w10", "w12"): e(-0.5),    # items 1, 2: one token at loss 1.0 ...
        ("w12", "w13"): e(-0.5), ("w13", "w14"): e(-0.5),    # ... against three tokens at 0.5 each
    })
    items = [
        hs.Item("w1 w2", ("w3", "w4", "w5", "w6"), 0),
        hs.Item("w10", ("w11", "w12 w13 w14", "w20", "w21"), 1),  # sum prefers w11 (1.0 < 1.5): acc wrong
        hs.Item("w10", ("w11", "w12 w13 w14", "w20", "w21"), 0),  # mean prefers w12.. (0.5 < 1.0): acc_norm wrong
    ]
    calls = []
    prepared = hs.prepare(items, tok, max_len=64)
    scores = hs.score(bigram_logits_fn(table, calls), prepared, batch_size=4)
    uniform = -math.log((1 - e(-1.0) - e(-0.5)) / 98)  # w20 given w10: the leftover mass, spread over 98
    np.testing.assert_allclose(scores.sum[1], [1.0, 1.5, uniform, uniform], rtol=1e-5)
    np.testing.assert_allclose(scores.mean[1], [1.0, 0.5, uniform, uniform], rtol=1e-5)
    np.testing.assert_array_equal(scores.count[1], [1, 3, 1, 1])
    assert scores.sum[0, 0] == pytest.approx(-math.log(0.9), rel=1e-5)
    assert np.argmin(scores.sum[0]) == 0
    result = hs.accuracy(scores, prepared.labels)
    assert (result.acc, result.acc_norm, result.items) == (pytest.approx(2 / 3), pytest.approx(2 / 3), 3)
    assert result.line() == "hellaswag acc 0.6667 acc_norm 0.6667 (3 items)"
    assert set(calls) == {(4, 32)}  # 12 rows, one bucket: 3 batches of one compiled shape

    # A context far longer than the window is cut on the left; a bigram sees the same losses.
    long_ctx = " ".join(f"w{30 + i % 50}" for i in range(200)) + " w10"
    calls.clear()
    items_long = items + [hs.Item(long_ctx, ("w11", "w12 w13 w14", "w20", "w21"), 1)]
    prepared = hs.prepare(items_long, tok, max_len=48)
    assert [b.length for b in prepared.buckets] == [32, 48]
    scores_long = hs.score(bigram_logits_fn(table, calls), prepared, batch_size=4)
    np.testing.assert_allclose(scores_long.sum[3], scores.sum[1], rtol=1e-6)
    assert set(calls) == {(4, 32), (4, 48)}  # one shape per bucket


def test_items_file_formats_and_errors(tmp_path, capsys):
    from jaxpretrain.errors import UserError
    from jaxpretrain.evaluation.hellaswag import load_items

    good = tmp_path / "val.jsonl"
    good.write_text(
        json.dumps({"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 2}) + "\n\n"
        + json.dumps({"ctx_a": "A cat.", "ctx_b": "it", "endings": ["a", "b", "c", "d"], "label": "1"}) + "\n"
    )
    items = load_items(str(good))
    assert [(i.ctx, i.label) for i in items] == [("A man", 2), ("A cat. it", 1)]
    assert len(load_items(str(good), limit=1)) == 1
    # Malformed rows are skipped and counted in one note naming the first; the good ones are scored.
    ok = json.dumps({"ctx": "x", "endings": ["a", "b"], "label": 1})
    for text, message in [
        (ok + '\n{"ctx": "x", "label": 0}\n', "line 2: `endings` must be"),
        ('{"ctx": "x", "endings": ["a", "b"], "label": 5}\n' + ok + "\n", "line 1: `label` must be an ending index 0..1"),
        ('{"endings": ["a", "b"], "label": 0}\n' + ok + "\n", "line 1: missing or non-string `ctx`"),
        (ok + "\nnot json\n\xff\n", "line 2: not valid JSON"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_bytes(text.encode("latin-1"))  # "\xff": a byte that is not UTF-8
        assert [(i.ctx, i.endings, i.label) for i in load_items(str(bad))] == [("x", ("a", "b"), 1)]
        skipped = 2 if "not json" in text else 1
        note = capsys.readouterr().err.strip()
        assert note.startswith(f"note: {bad}: {skipped} malformed row{'s' * (skipped > 1)} skipped (first: {message}"), note
        assert note.endswith("; 1 items scored") and "\n" not in note, note
    for text, message in [("", "holds no items"), ("not json\n", "holds no items (1 malformed row skipped)")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(UserError, match=re.escape(str(bad)) + ".*" + re.escape(message)):
            load_items(str(bad))
    with pytest.raises(UserError, match="is a directory"):
        load_items(str(tmp_path))


# -- (b) a random GPT-2 against transformers' torch model -----------------------------------------

ITEMS = [
    {"ctx": "A man is sitting on a roof. he", "label": 3, "endings": [
        "is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
        "starts pulling up roofing on a roof."]},
    {"ctx": "A woman is outside with a bucket and a dog. The dog is running around trying to avoid a bath. she",
     "label": 3, "endings": [
        "rinses the bucket off with soap and blow dry the dog's head.",
        "uses a hose to keep it from getting soapy.", "gets the dog wet, then it runs away again.",
        "gets into a bath tub with the dog."]},
    {"ctx": "Kids are sitting on a bench. They", "label": 0, "endings": [
        "talk to each other.", "fly.", "are playing the guitar while standing on a tall ladder in the rain.", "eat."]},
    {"ctx": "How to make tea. Boil water.", "label": 1, "endings": [
        "Then throw the kettle.", "Pour it over the tea bag and wait three minutes.", "Sing.", "Paint the cup blue."]},
    {"ctx": " ".join(["The history of the city is long and full of wars, trade and learning."] * 12) + " Today it",
     "label": 2, "endings": ["sleeps.", "is a fish.", "is a busy port with a famous university.", "was never there."]},
    {"ctx": "He picks up the ball and", "label": 0, "endings": [
        "throws it to his friend across the field.", "eats it.", "becomes a tree.", "runs."]},
]
N_POSITIONS = 128  # the long context above is ~190 tokens: it must be cut on the left


def torch_scores(hf_dir, items, max_len):
    """build-nanogpt's hellaswag.py scoring, with transformers' torch model and tokenizer of `hf_dir`."""
    import torch
    from torch.nn import functional as F
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    sums, means = [], []
    for example in items:
        ctx_tokens = tok.encode(example["ctx"])
        tok_rows, mask_rows = [], []
        for end in example["endings"]:
            end_tokens = tok.encode(" " + end)
            tok_rows.append((ctx_tokens + end_tokens)[-max_len:])  # left-truncate to the window
            mask_rows.append(([0] * len(ctx_tokens) + [1] * len(end_tokens))[-max_len:])
        width = max(len(r) for r in tok_rows)
        tokens = torch.zeros((len(tok_rows), width), dtype=torch.long)
        mask = torch.zeros((len(tok_rows), width), dtype=torch.long)
        for i, (t, m) in enumerate(zip(tok_rows, mask_rows)):
            tokens[i, : len(t)] = torch.tensor(t)
            mask[i, : len(m)] = torch.tensor(m)
        with torch.no_grad():
            logits = model(tokens).logits
        shift_logits = logits[..., :-1, :].contiguous()
        shift_tokens = tokens[..., 1:].contiguous()
        shift_losses = F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_tokens.view(-1), reduction="none")
        shift_losses = shift_losses.view(tokens.size(0), -1)
        shift_mask = mask[..., 1:].contiguous()
        sum_loss = (shift_losses * shift_mask).sum(dim=1)
        sums.append(sum_loss.double().numpy())
        means.append((sum_loss / shift_mask.sum(dim=1)).double().numpy())
    return np.array(sums), np.array(means)


@pytest.fixture(scope="module")
def random_gpt2(tmp_path_factory):
    """A random 2-layer GPT-2 saved as an HF directory, and the HellaSwag file of ITEMS."""
    import jax.numpy as jnp
    import transformers

    import jaxpretrain.model as M

    root = tmp_path_factory.mktemp("hellaswag")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=N_POSITIONS)
    model = M.create_model(config, seed=3, dtype=jnp.float32)
    M.save_pretrained(model, str(root / "hf"), tokenizer="gpt2")
    data = root / "hellaswag_val.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in ITEMS))
    return str(root / "hf"), str(data), model


@pytest.fixture(scope="module")
def torch_reference(random_gpt2):
    return torch_scores(random_gpt2[0], ITEMS, N_POSITIONS)


def test_random_gpt2_equals_torch_build_nanogpt_scoring(random_gpt2, torch_reference):
    import jaxpretrain.model as M
    from jaxpretrain.evaluation import hellaswag as hs
    from jaxpretrain.tokenizer import load_tokenizer

    hf_dir, data, _ = random_gpt2
    items = hs.load_items(data)
    prepared = hs.prepare(items, load_tokenizer(hf_dir), max_len=N_POSITIONS)
    assert len(prepared.buckets) >= 2  # several padded lengths, so bucketing is exercised
    scores = hs.score(hs.model_logits_fn(M.from_pretrained(hf_dir)), prepared, batch_size=5)
    ref_sum, ref_mean = torch_reference
    np.testing.assert_allclose(scores.sum, ref_sum, rtol=2e-5, atol=2e-4)
    np.testing.assert_allclose(scores.mean, ref_mean, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(np.argmin(scores.sum, 1), np.argmin(ref_sum, 1))
    np.testing.assert_array_equal(np.argmin(scores.mean, 1), np.argmin(ref_mean, 1))


# -- (c) the CLI --------------------------------------------------------------------------------------


def test_cli_from_hf_dir_and_checkpoint(random_gpt2, torch_reference, tmp_path):
    import grain
    import jax.numpy as jnp
    from flax import nnx

    from jaxpretrain.train.checkpoint import TrainCheckpointer

    hf_dir, data, model = random_gpt2
    ref_sum, ref_mean = torch_reference
    labels = np.array([it["label"] for it in ITEMS])
    expected = (f"{np.mean(np.argmin(ref_sum, 1) == labels):.4f}", f"{np.mean(np.argmin(ref_mean, 1) == labels):.4f}")

    # By the module where the scoring lives: the same CLI as `python -m jaxpretrain.eval hellaswag`.
    r = run_module("jaxpretrain.evaluation.hellaswag", "--model", hf_dir, "--data", data, "--batch-size", "8", timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    m = FINAL.match(lines[-1])
    assert m and (m.group(1), m.group(2)) == expected and m.group(3) == str(len(ITEMS)), r.stdout
    assert "OpenAI GPT-2 124M 0.2955" in lines[-2] and "~0.294" in lines[-2]

    # The same weights as a training checkpoint (what the train loop saves: params, optimizer, loader, meta).
    ckpt_dir = str(tmp_path / "ckpt")
    ckpt = TrainCheckpointer(ckpt_dir, async_save=False)
    meta = {"step": 7, "config": {"model": {"vocab_multiple": 1}}, "model_config": model.config.to_dict(), "tokenizer": "gpt2"}
    loader_it = iter(grain.MapDataset.range(4).to_iter_dataset())
    ckpt.save(7, params=nnx.state(model, nnx.Param), opt_state={"count": jnp.zeros((), jnp.int32)}, data_iterator=loader_it, meta=meta)
    ckpt.close()
    r = run_module("jaxpretrain.eval", "hellaswag", "--checkpoint-dir", ckpt_dir, "--data", data, "--limit", "4", timeout=300)
    assert r.returncode == 0, r.stderr
    m = FINAL.match(r.stdout.strip().splitlines()[-1])
    expected4 = (f"{np.mean(np.argmin(ref_sum[:4], 1) == labels[:4]):.4f}", f"{np.mean(np.argmin(ref_mean[:4], 1) == labels[:4]):.4f}")
    assert m and (m.group(1), m.group(2)) == expected4 and m.group(3) == "4", r.stdout
    assert "step 7" in r.stderr
    assert "WARNING:absl" not in r.stderr, r.stderr  # Orbax's read-only notices, silenced as in export


def test_cli_bad_input_is_one_line_exit_2(random_gpt2, tmp_path):
    hf_dir, _, _ = random_gpt2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"ctx": "x", "label": 0}) + "\n")
    for args, message in [
        (["--model", hf_dir, "--data", str(bad)], f"error: {bad}: holds no items (1 malformed row skipped)"),
        (["--model", hf_dir, "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
        (["--model", str(tmp_path / "nope"), "--data", str(bad)], "nope"),
        (["--model", hf_dir, "--step", "2", "--data", str(bad)], f"error: --step: applies to --checkpoint-dir only, not to --model {hf_dir}"),
    ]:
        if "nope" in message:
            bad.write_text(json.dumps(ITEMS[0]) + "\n")
        r = run_module("jaxpretrain.eval", "hellaswag", *args, timeout=300)
        r.stderr = "\n".join(line for line in r.stderr.splitlines() if not line.startswith("note: "))
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# -- (d) sharded parameters and batches on a mesh -----------------------------------------------------

_SHARDED = r"""
import json, sys
import jax
import jaxpretrain.model as M
from jaxpretrain import parallel
from jaxpretrain.evaluation import hellaswag as hs
from jaxpretrain.tokenizer import load_tokenizer

hf_dir, data, n_positions = sys.argv[1], sys.argv[2], int(sys.argv[3])
prepared = hs.prepare(hs.load_items(data), load_tokenizer(hf_dir), max_len=n_positions)
one = hs.score(hs.model_logits_fn(M.from_pretrained(hf_dir)), prepared, batch_size=4)
mesh = parallel.make_mesh(tp_size=2)  # 4 devices: fsdp 2 x tensor 2
model = M.from_pretrained(hf_dir, mesh=mesh)
sharded = hs.score(hs.model_logits_fn(model, mesh), prepared, batch_size=4, sharding=parallel.batch_sharding(mesh))
print(json.dumps({"mesh": dict(mesh.shape), "one": one.sum.tolist(), "sharded": sharded.sum.tolist(),
                  "wte": str(model.wte.embedding[...].sharding.spec)}))
"""


def test_sharded_params_and_batches_give_the_one_device_losses(random_gpt2):
    hf_dir, data, _ = random_gpt2
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _SHARDED, hf_dir, data, str(N_POSITIONS)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["mesh"] == {"replicate": 1, "fsdp": 2, "tensor": 2}
    assert "fsdp" in out["wte"]  # the parameters really are split
    np.testing.assert_allclose(out["sharded"], out["one"], rtol=1e-5, atol=1e-4)


# -- (e) during training ----------------------------------------------------------------------------


def test_training_logs_hellaswag_at_the_scoring_of_its_checkpoint(random_gpt2, token_glob, tmp_path):
    """`eval.hellaswag_path` during training: the `[eval]` line's acc_norm is build-nanogpt's torch
    scoring of the checkpoint saved at that step."""
    from test_train import as_flags, python, tiny_overrides

    _, data, _ = random_gpt2
    ckpt = str(tmp_path / "ckpt")
    o = tiny_overrides(token_glob, ckpt, **{
        "model.dropout": 0.0, "step_scheduler.max_steps": 2, "step_scheduler.ckpt_every_steps": 2,
        "lr_scheduler.lr_warmup_steps": 1, "eval.hellaswag_path": data, "eval.batch_size": 8,
    })
    r = python("-m", "jaxpretrain.train", *as_flags(o))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [m for m in map(re.compile(r"\[eval\] step (\d+) \| hellaswag acc_norm (\d\.\d{4})").search, r.stdout.splitlines()) if m]
    assert [int(m.group(1)) for m in lines] == [2]
    with open(os.path.join(ckpt, "logs", "eval.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert [x["step"] for x in logged] == [2] and logged[0]["items"] == len(ITEMS)

    hf_dir = str(tmp_path / "hf")
    assert python("-m", "jaxpretrain.export", "--checkpoint-dir", ckpt, "--output", hf_dir).returncode == 0
    sums, means = torch_scores(hf_dir, ITEMS, 64)
    labels = np.array([it["label"] for it in ITEMS])
    assert abs(float(np.mean(np.argmin(means, axis=1) == labels)) - logged[0]["hellaswag_acc_norm"]) < 1e-9
    assert abs(float(np.mean(np.argmin(sums, axis=1) == labels)) - logged[0]["hellaswag_acc"]) < 1e-9
    # The accuracies move in steps of 1/6 and barely after two steps; the label endings' loss tells
    # the step-2 weights from any others (the initial weights pass the two lines above).
    label_loss = float(np.mean(np.asarray(means)[np.arange(len(labels)), labels]))
    assert logged[0]["hellaswag_label_loss"] == pytest.approx(label_loss, rel=1e-5)
