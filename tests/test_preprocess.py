"""The preprocessing CLI writes exactly what megatron-core's IndexedDatasetBuilder writes for HF's ids, for
many files and for one file split across workers; bad rows are skipped and counted; fatal problems are
one line without a traceback; interrupted runs leave no complete-looking pair."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import megatron_reference, run_module, word_level_tokenizer
from jaxpretrain import preprocess
from jaxpretrain.data.indexed import IndexedDataset
from jaxpretrain.errors import UserError
from jaxpretrain.preprocess import preprocess_files


def _assert_same_pair(ours, reference):
    for ext in (".bin", ".idx"):
        with open(ours + ext, "rb") as a, open(reference + ext, "rb") as b:
            assert a.read() == b.read(), f"{ours}{ext} differs from megatron-core's {reference}{ext}"


def _pairs(directory):
    return sorted(name for name in os.listdir(directory) if name.endswith((".bin", ".idx")))


def test_cli_many_files_is_byte_identical_to_megatron(stdlib_jsonl, stdlib_reference, tmp_path):
    out = tmp_path / "out"
    pattern = os.path.join(os.path.dirname(stdlib_jsonl[0]), "*.jsonl")
    result = run_module(
        "jaxpretrain.preprocess", "--input", pattern, "--json-keys", "text", "--output-prefix", "processed_data",
        "--output-path", str(out), "--workers", "2", "--append-eod",
    )
    assert result.returncode == 0, result.stderr
    assert "documents 300 |" in result.stdout and "skipped 0 rows" in result.stdout
    for i, reference in enumerate(stdlib_reference):
        _assert_same_pair(str(out / f"processed_data_{i}_text_document"), reference)
    assert len(_pairs(out)) == 2 * len(stdlib_jsonl)

    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronDataset

    ours, theirs = IndexedDataset(str(out / "processed_data_1_text_document")), MegatronDataset(stdlib_reference[1])
    assert ours[0][-1] == 50256 and ours.dtype == np.uint16
    for i in range(len(ours)):
        np.testing.assert_array_equal(ours[i], theirs[i])


def test_cli_one_big_file_split_across_workers(stdlib_jsonl, gpt2_tokenizer, tmp_path):
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as out:
        for path in stdlib_jsonl:
            with open(path, "rb") as f:
                out.write(f.read())
    reference = megatron_reference([str(big)], str(tmp_path), gpt2_tokenizer)[0]
    units = preprocess.plan_units([str(big)], "auto", workers=2)
    assert len(units) > 2  # the file really is cut into pieces
    result = run_module(
        "jaxpretrain.preprocess", "--input", str(big), "--output-prefix", str(tmp_path / "cli" / "big"),
        "--workers", "2", "--append-eod", "--quiet",
    )
    assert result.returncode == 0, result.stderr
    _assert_same_pair(str(tmp_path / "cli" / "big_0_text_document"), reference)
    # Cut into many more pieces than lines fit in (most units own no line start): still identical.
    summary = preprocess_files(
        str(big), output_prefix=str(tmp_path / "tiny_units" / "big"), workers=2, append_eod=True, unit_bytes=4096,
    )
    assert summary.documents == 300
    _assert_same_pair(str(tmp_path / "tiny_units" / "big_0_text_document"), reference)


def test_hf_path_and_no_eod(stdlib_jsonl, gpt2_tokenizer, tmp_path):
    files = stdlib_jsonl[:1]
    reference = megatron_reference(files, str(tmp_path), gpt2_tokenizer, append_eod=False)[0]
    summary = preprocess_files(files, output_prefix=str(tmp_path / "hf" / "p"), hf_tokenizer=True, workers=1)
    assert summary.encoder.startswith("HF tokenizer")
    _assert_same_pair(str(tmp_path / "hf" / "p_0_text_document"), reference)
    summary = preprocess_files(files, output_prefix=str(tmp_path / "fast" / "p"), workers=1)
    assert summary.encoder.startswith("tiktoken")
    _assert_same_pair(str(tmp_path / "fast" / "p_0_text_document"), reference)


BAD_ROWS = [
    b'{"text": "first good row"}',
    b"",
    b"   ",
    b'{"text": "bad utf8 \xff\xfe here"}',
    b'{"text": "truncated json',
    b"[1, 2, 3]",
    b'{"content": "missing key"}',
    b'{"text": null}',
    b'{"text": ""}',
    b'{"text": 42}',
    b'{"text": "lone surrogate \\ud800 here"}',
    b'{"text": "special <|endoftext|> inside, and \\u00e9\\u00e8 escapes"}',
    b'{"text": "windows line ending"}\r',
    b'{"text": "last row without newline"}',
]


def test_bad_rows_are_skipped_and_counted(gpt2_tokenizer, tmp_path):
    path = tmp_path / "messy.jsonl"
    path.write_bytes(b"\n".join(BAD_ROWS))
    summary = preprocess_files(str(path), output_prefix=str(tmp_path / "out" / "m"), append_eod=True, workers=1)
    assert summary.documents == 4
    assert summary.skipped == {
        "blank line": 2, "invalid UTF-8": 1, "bad JSON": 1, "not a JSON object": 1, "missing key 'text'": 1,
        "null text": 1, "empty text": 1, "text is not a string": 1, "invalid unicode (lone surrogate)": 1,
    }
    assert "skipped 10 row(s): blank line 2" in summary.format()
    reference = megatron_reference([str(path)], str(tmp_path), gpt2_tokenizer)[0]
    _assert_same_pair(str(tmp_path / "out" / "m_0_text_document"), reference)
    ds = IndexedDataset(str(tmp_path / "out" / "m_0_text_document"))
    assert 50256 in ds[1][:-1].tolist()  # <|endoftext|> inside a text is the special id, as in HF


def test_several_keys_stay_aligned(tmp_path):
    path = tmp_path / "two_keys.jsonl"
    rows = [{"text": "alpha beta", "title": "A"}, {"text": "no title"}, {"text": "gamma", "title": "G"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = preprocess_files(str(path), output_prefix=str(tmp_path / "k"), json_keys=["text", "title"])
    assert summary.skipped == {"missing key 'title'": 1}
    text, title = IndexedDataset(str(tmp_path / "k_0_text_document")), IndexedDataset(str(tmp_path / "k_0_title_document"))
    assert text.num_documents == title.num_documents == 2


def test_parquet_input(gpt2_tokenizer, tmp_path, monkeypatch):
    import multiprocessing

    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row {i}: " + "some words " * (i % 7) for i in range(200)] + [None, ""]
    path = str(tmp_path / "data.parquet")
    pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), path, row_group_size=16)
    reference = megatron_reference([path], str(tmp_path), gpt2_tokenizer)[0]
    # Spawned workers, as used where fork is not safe (a caller that imported JAX, macOS).
    monkeypatch.setattr(preprocess, "_pool_context", lambda: multiprocessing.get_context("spawn"))
    summary = preprocess_files(path, output_prefix=str(tmp_path / "pq" / "p"), append_eod=True, workers=2, unit_bytes=1)
    assert summary.documents == 200 and summary.skipped == {"null text": 1, "empty text": 1}
    _assert_same_pair(str(tmp_path / "pq" / "p_0_text_document"), reference)
    # No row has the key: one line that lists the keys seen, and no empty pair left behind.
    with pytest.raises(UserError, match=r"no row has the key 'body'.*keys seen: 'n', 'text'; nothing was written"):
        preprocess_files(path, output_prefix=str(tmp_path / "pq2" / "p"), text_column="body", input_type="parquet")
    assert not (tmp_path / "pq2").exists() or not any((tmp_path / "pq2").iterdir())


def test_large_vocabulary_writes_int32(tmp_path):
    tokenizer = word_level_tokenizer(vocab_size=70_000)
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    path = tmp_path / "words.jsonl"
    rows = [" ".join(f"w{(i * 7919 + j) % 69_998}" for j in range(i % 13 + 1)) for i in range(50)]
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    reference = megatron_reference([str(path)], str(tmp_path), tokenizer)[0]
    summary = preprocess_files(
        str(path), output_prefix=str(tmp_path / "out" / "w"), tokenizer=str(tmp_path / "tok"), append_eod=True, workers=2,
        unit_bytes=256,
    )
    assert summary.dtype == "int32" and summary.encoder.startswith("HF tokenizer")
    _assert_same_pair(str(tmp_path / "out" / "w_0_text_document"), reference)


def test_empty_input_file_is_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(UserError, match=r"empty.jsonl: no usable document \(the input is empty\); nothing was written"):
        preprocess_files(str(tmp_path / "empty.jsonl"), output_prefix=str(tmp_path / "out" / "e"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_interrupted_run_leaves_no_pair(stdlib_jsonl, tmp_path, monkeypatch):
    real = preprocess.process_unit
    calls = []

    def failing(unit):
        calls.append(unit)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(unit)

    monkeypatch.setattr(preprocess, "process_unit", failing)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        preprocess_files(stdlib_jsonl[0], output_prefix=str(out / "p"), workers=1, unit_bytes=100_000)
    assert not out.exists()  # the run created it, and it is empty: removed with the partial files


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no match", "error: --input {tmp}/nothing/*.jsonl: no file matches"),
        ("split sentences", "error: --split-sentences: not supported"),
        ("unwritable output", "error: {tmp}/a_file/sub: output directory is not writable"),
        ("repeated key", "error: --json-keys: 'text' is given more than once"),
        ("empty prefix", "error: --output-prefix '': must end in a file name prefix"),
    ],
)
def test_fatal_errors_are_one_line(stdlib_jsonl, tmp_path, case, expected):
    blocker = tmp_path / "a_file"  # a file where a directory is wanted (tests may run as root: no chmod tricks)
    blocker.write_text("not a directory")
    argv = {"--input": stdlib_jsonl[0], "--output-prefix": "p", "--output-path": str(tmp_path / "out"), "--workers": "1"}
    extra = []
    if case == "no match":
        argv["--input"] = str(tmp_path / "nothing" / "*.jsonl")
    elif case == "split sentences":
        extra = ["--split-sentences"]
    elif case == "repeated key":
        extra = ["--json-keys", "text", "text"]
    elif case == "empty prefix":
        argv["--output-prefix"] = ""
    else:
        argv["--output-path"] = str(blocker / "sub")
    result = run_module("jaxpretrain.preprocess", *[x for kv in argv.items() for x in kv], *extra)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected.format(tmp=tmp_path)), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # rejected before any output (or its directory) was made


def test_output_names_follow_automodel(tmp_path):
    assert preprocess.output_prefix_for("data/processed", None, 3, "text") == "data/processed_3_text_document"
    assert preprocess.output_prefix_for("ignored/dir/processed", "out", 0, "text") == os.path.join(
        "out", "processed_0_text_document"
    )
    with pytest.raises(UserError, match="--workers"):
        preprocess_files("*.jsonl", output_prefix=str(tmp_path / "p"), workers=0)


def test_bad_output_prefix_and_repeated_keys_are_rejected(tmp_path):
    for prefix in ("", str(tmp_path / "dir") + os.sep, "."):
        with pytest.raises(UserError, match="--output-prefix"):
            preprocess_files("*.jsonl", output_prefix=prefix, output_path=str(tmp_path / "out"))
    with pytest.raises(UserError, match=r"--json-keys: 'text' is given more than once"):
        preprocess_files("*.jsonl", output_prefix="p", json_keys=["text", "title", "text"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "dir").exists()


def test_failed_run_removes_only_the_empty_output_directory_it_created(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "hello"}\n')
    (tmp_path / "empty.jsonl").write_bytes(b"")
    failures = [
        dict(input=str(good), json_keys=["body"]),  # no row has the key
        dict(input=str(good), tokenizer=str(tmp_path / "no_such_tokenizer")),
        dict(input=str(tmp_path / "empty.jsonl")),
    ]
    for kwargs in failures:
        with pytest.raises(UserError):
            preprocess_files(**kwargs, output_prefix="p", output_path=str(tmp_path / "new" / "sub"))
        assert not (tmp_path / "new").exists(), kwargs
    (tmp_path / "existing").mkdir()  # there before the run: kept
    with pytest.raises(UserError):
        preprocess_files(str(good), json_keys=["body"], output_prefix=str(tmp_path / "existing" / "p"))
    assert (tmp_path / "existing").is_dir()
