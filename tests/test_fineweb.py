"""FineWeb-Edu preparation (`python -m jaxpretrain.data.fineweb`) on parquet shards written here.

References: the input rows themselves (every document exactly once), GNU coreutils `split -n r/N`,
`head -n K` and `sed -i '1,Kd'` (lingua's own dealing and validation commands, run on our one-chunk
output), the child's peak RSS from the kernel (`os.wait4`), and our preprocess + train CLIs.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from test_train import as_flags, python, tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = "fineweb_edu_10bt_shuffled"
IN_ORDER = "fineweb_edu_10bt"
WORDS = np.array("the of and a to in is was for on that with as by at from his an were are which be this".split())


def write_shards(src, n_shards, rows, *, words_per_doc=60, seed=0, first_shard=0):
    """FineWeb-Edu-like shards (text, id, url, score, int_score, token_count, a timestamp); returns the rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(src, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = []
    for s in range(first_shard, first_shard + n_shards):
        ids = [f"<urn:uuid:{s:03d}-{i:05d}>" for i in range(rows)]
        texts = [f"doc {d}: " + " ".join(rng.choice(WORDS, words_per_doc)) + "\nsecond line, ünïcode" for d in ids]
        scores = rng.random(rows) * 5
        table = pa.table({
            "text": texts, "id": ids, "url": [f"https://example.org/{s}/{i}" for i in range(rows)],
            "score": scores, "int_score": np.rint(scores).astype(np.int64),
            "token_count": rng.integers(10, 1000, rows),
            "crawled": pa.array([datetime.datetime(2024, 1, 1, 12, 0, i % 60) for i in range(rows)], pa.timestamp("s")),
        })
        pq.write_table(table, os.path.join(src, f"{s:03d}_00000.parquet"), row_group_size=256)
        written += table.to_pylist()
    return written


def fineweb(*args, env=None):
    """Run the CLI; returns (returncode, stdout, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxpretrain.data.fineweb", *map(str, args)], cwd=ROOT,
        env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


# Runs the CLI and prints its peak RSS (KiB). A child's ru_maxrss includes the memory of the process
# that forked it (Linux keeps the high-water mark across exec), so the fork happens here, in a small
# Python, not in the test process with its hundreds of MiB of imports.
_RSS_WRAPPER = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
)


def fineweb_with_rss(*args):
    """Run the CLI; returns its peak resident memory in MiB, as the kernel counts it."""
    r = python("-c", _RSS_WRAPPER, sys.executable, "-m", "jaxpretrain.data.fineweb", *map(str, args), timeout=300)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1]) / 1024


def read_out(data_dir):
    out = os.path.join(data_dir, OUT)
    chunks = sorted(f for f in os.listdir(out) if ".chunk." in f)
    lines = {f: open(os.path.join(out, f), "rb").read().splitlines() for f in chunks + ["fineweb_edu_10bt.val.jsonl"]}
    assert not [f for f in os.listdir(out) if f.startswith(".")], "temporary files left behind"
    return lines


def as_key(row):
    return row["id"], row["text"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    src = tmp_path_factory.mktemp("parquet")
    rows = write_shards(str(src), 4, 250)
    return str(src), rows


def test_every_document_once_shuffled_seeded_with_all_columns(shards, tmp_path):
    src, rows = shards
    rc, out, err = fineweb("--data-dir", tmp_path / "a", "--seed", 42, "--nchunks", 3, "--source", src, "--val-lines-per-chunk", 20)
    assert rc == 0, err
    assert "1,000 documents" in out and "3 chunks" in out and "60 validation lines" in out
    files = read_out(tmp_path / "a")
    assert sorted(files) == [f"fineweb_edu_10bt.chunk.{i:02d}.jsonl" for i in range(3)] + ["fineweb_edu_10bt.val.jsonl"]
    assert len(files["fineweb_edu_10bt.val.jsonl"]) == 60
    # split -n r/3 deals 1000 lines as 334/333/333; the first 20 of each went to validation.
    assert [len(files[f"fineweb_edu_10bt.chunk.{i:02d}.jsonl"]) for i in range(3)] == [314, 313, 313]

    got = [json.loads(line) for lines in files.values() for line in lines]
    assert sorted(map(as_key, got)) == sorted(map(as_key, rows))  # every document exactly once
    by_id = {r["id"]: r for r in rows}
    for g in got:  # the other columns ride along, timestamps as ISO strings
        want = dict(by_id[g["id"]], crawled=by_id[g["id"]]["crawled"].isoformat())
        assert g == want
    order = [g["id"] for g in got]
    assert order != [r["id"] for r in rows]
    # Shuffled through the whole input, not within shards: the first 100 lines come from every shard.
    first_chunk = [json.loads(line)["id"] for line in files["fineweb_edu_10bt.chunk.00.jsonl"][:100]]
    assert {i.split("-")[0] for i in first_chunk} == {f"<urn:uuid:{s:03d}" for s in range(4)}

    # In input order too, one file per shard (lingua's datatrove step, the files the seed preprocesses).
    in_order = tmp_path / "a" / IN_ORDER
    assert sorted(os.listdir(in_order)) == [f"fineweb_edu_10bt.chunk.{i:05d}.jsonl" for i in range(4)]
    for i in range(4):
        got = [json.loads(line) for line in open(in_order / f"fineweb_edu_10bt.chunk.{i:05d}.jsonl")]
        assert [g["id"] for g in got] == [r["id"] for r in rows[250 * i : 250 * (i + 1)]]

    rc, _, err = fineweb("--data-dir", tmp_path / "b", "--seed", 42, "--nchunks", 3, "--source", src, "--val-lines-per-chunk", 20)
    assert rc == 0, err
    assert read_out(tmp_path / "b") == files  # the same seed: byte-identical output
    rc, _, err = fineweb("--data-dir", tmp_path / "c", "--seed", 43, "--nchunks", 3, "--source", src, "--val-lines-per-chunk", 20)
    assert rc == 0, err
    other = read_out(tmp_path / "c")
    assert other != files
    assert sorted(line for lines in other.values() for line in lines) == sorted(line for lines in files.values() for line in lines)


def test_chunks_and_validation_are_lingua_split_head_sed(shards, tmp_path):
    """Our chunks + validation equal lingua's commands (`split -n r/3 -d --suffix-length 2`, then
    `head -n K >> val` and `sed -i '1,Kd'` per chunk) applied to our one-chunk shuffled stream."""
    src, _ = shards
    rc, _, err = fineweb("--data-dir", tmp_path / "one", "--nchunks", 1, "--source", src, "--val-lines-per-chunk", 0)
    assert rc == 0, err
    stream = os.path.join(tmp_path / "one", OUT, "fineweb_edu_10bt.chunk.00.jsonl")
    ref = tmp_path / "ref"
    ref.mkdir()
    prefix = str(ref / "fineweb_edu_10bt.chunk.")
    subprocess.run(["split", "-n", "r/3", "-d", "--suffix-length", "2", "--additional-suffix", ".jsonl", stream, prefix], check=True)
    val = ref / "fineweb_edu_10bt.val.jsonl"
    for i in range(3):
        chunk = f"{prefix}{i:02d}.jsonl"
        subprocess.run(f"head -n 7 {chunk} >> {val} && sed -i '1,7d' {chunk}", shell=True, check=True)

    rc, _, err = fineweb("--data-dir", tmp_path / "three", "--nchunks", 3, "--source", src, "--val-lines-per-chunk", 7)
    assert rc == 0, err
    ours = os.path.join(tmp_path / "three", OUT)
    assert sorted(os.listdir(ours)) == sorted(os.listdir(ref))
    for name in os.listdir(ref):
        assert open(os.path.join(ours, name), "rb").read() == open(ref / name, "rb").read(), name

    # A rerun with fewer chunks replaces the files and leaves no stale chunk behind.
    rc, _, err = fineweb("--data-dir", tmp_path / "three", "--nchunks", 2, "--source", src, "--val-lines-per-chunk", 7)
    assert rc == 0, err
    assert sorted(os.listdir(ours)) == [f"fineweb_edu_10bt.chunk.0{i}.jsonl" for i in range(2)] + ["fineweb_edu_10bt.val.jsonl"]


def test_in_order_files_follow_datatrove_ranks_past_64_shards(tmp_path):
    """datatrove's 64 tasks take the sorted files rank, rank+64, ...: 66 shards give 64 files, the
    first two holding two shards each; --shuffled-only writes none of them."""
    src = tmp_path / "many"
    rows = write_shards(str(src), 66, 3, words_per_doc=5)
    rc, _, err = fineweb("--data-dir", tmp_path / "d", "--source", src, "--val-lines-per-chunk", 0)
    assert rc == 0, err
    in_order = tmp_path / "d" / IN_ORDER
    assert sorted(os.listdir(in_order)) == [f"fineweb_edu_10bt.chunk.{r:05d}.jsonl" for r in range(64)]
    ids = lambda r: [json.loads(line)["id"] for line in open(in_order / f"fineweb_edu_10bt.chunk.{r:05d}.jsonl")]
    shard = lambda s: [r["id"] for r in rows[3 * s : 3 * s + 3]]
    assert ids(0) == shard(0) + shard(64) and ids(1) == shard(1) + shard(65) and ids(63) == shard(63)
    rc, out, err = fineweb("--data-dir", tmp_path / "e", "--source", src, "--val-lines-per-chunk", 0, "--shuffled-only")
    assert rc == 0, err
    assert not (tmp_path / "e" / IN_ORDER).exists() or not os.listdir(tmp_path / "e" / IN_ORDER)
    assert len(read_out(tmp_path / "e")["fineweb_edu_10bt.chunk.00.jsonl"]) == 198


def test_peak_memory_does_not_grow_with_the_input(tmp_path):
    """4x the input, same --memory: the peak RSS stays put. (With one bucket for everything, i.e. the
    input loaded whole, the same 4x adds about 40 MiB.)"""
    small, large = str(tmp_path / "x1"), str(tmp_path / "x4")
    write_shards(small, 4, 1000, words_per_doc=400)  # ~6.6 MiB of JSONL
    shutil.copytree(small, large)
    write_shards(large, 12, 1000, words_per_doc=400, seed=1, first_shard=4)  # ~26.5 MiB
    rss = {}
    for name, src in (("x1", small), ("x4", large)):
        rss[name] = fineweb_with_rss("--data-dir", tmp_path / f"out_{name}", "--source", src, "--memory", 0.004,
                                     "--workers", 1, "--val-lines-per-chunk", 10)
    out4 = os.path.join(tmp_path / "out_x4", OUT)
    json_mib = sum(os.path.getsize(os.path.join(out4, f)) for f in os.listdir(out4)) / 2**20
    assert json_mib > 25
    assert rss["x4"] < rss["x1"] + 8, (rss, json_mib)  # run-to-run noise is 1-3 MiB


def test_bad_inputs_are_one_line_exit_2_and_write_nothing(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cases = {}
    empty = tmp_path / "empty"
    empty.mkdir()
    cases["holds no parquet files"] = ["--source", empty]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "000_00000.parquet").write_bytes(b"not parquet at all")
    cases[f"{broken / '000_00000.parquet'}: not a readable parquet file"] = ["--source", broken]
    notext = tmp_path / "notext"
    notext.mkdir()
    pq.write_table(pa.table({"content": ["a", "b"], "id": ["1", "2"]}), notext / "000_00000.parquet")
    cases["000_00000.parquet: no `text` column (columns: content, id)"] = ["--source", notext]
    cases["--nchunks: must be between 1 and 100"] = ["--source", notext, "--nchunks", 0]
    small = tmp_path / "small"
    small.mkdir()
    pq.write_table(pa.table({"text": ["a", "b", "c"]}), small / "000_00000.parquet")
    cases["--workers: must be at least 1, got 0"] = ["--source", small, "--workers", 0]
    # Fewer rows than the default 10000 validation lines: the training chunk would be empty.
    cases["--val-lines-per-chunk 10,000: the input's 3 rows give 3 lines to a chunk (--nchunks 1), so it would keep "
          "no training line; use at most 2"] = ["--source", small]
    cases["--source PARQUET_DIR"] = []  # no --source: the download, offline here (HF_HUB_OFFLINE=1)
    for expected, args in cases.items():
        data_dir = tmp_path / "data"
        rc, out, err = fineweb("--data-dir", data_dir, *args, env={"HF_HUB_OFFLINE": "1"})
        assert rc == 2, (expected, out, err)
        assert len(err.strip().splitlines()) <= 2 and "Traceback" not in err, err  # the download notice + the error
        assert err.strip().splitlines()[-1].startswith("error: ") and expected in err, err
        for d in (data_dir / OUT, data_dir / IN_ORDER):
            assert not d.exists() or not os.listdir(d), os.listdir(d)


def test_output_preprocesses_and_trains(tmp_path):
    """Real text (CPython's stdlib as parquet shards) -> fineweb -> preprocess -> two training steps.
    The input-order files tokenize exactly as the parquet shards themselves do."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jaxpretrain.data.stdlib_corpus import write_stdlib_jsonl

    src = tmp_path / "parquet"
    src.mkdir()
    for i, path in enumerate(write_stdlib_jsonl(str(tmp_path / "jsonl"), num_files=2, max_docs=200)):
        rows = [json.loads(line) for line in open(path)]
        pq.write_table(pa.Table.from_pylist(rows), src / f"{i:03d}_00000.parquet")
    rc, _, err = fineweb("--data-dir", tmp_path / "data", "--nchunks", 2, "--source", src, "--val-lines-per-chunk", 10)
    assert rc == 0, err

    def preprocess(pattern, out, *extra):
        r = python("-m", "jaxpretrain.preprocess", "--input", pattern, "--json-keys", "text", "--output-prefix",
                   "processed_data", "--output-path", str(out), "--workers", "2", "--append-eod", *extra)
        assert r.returncode == 0, r.stderr
        return sorted(os.listdir(out))

    # The seed's command on the input-order files = the same command on the parquet shards.
    seed_glob = str(tmp_path / "data" / IN_ORDER / "fineweb_edu_10bt.chunk.*.jsonl")
    names = preprocess(seed_glob, tmp_path / "tok_seed")
    assert names == preprocess(str(src / "*.parquet"), tmp_path / "tok_parquet", "--input-type", "parquet")
    for name in names:
        assert (tmp_path / "tok_seed" / name).read_bytes() == (tmp_path / "tok_parquet" / name).read_bytes(), name

    shuffled = str(tmp_path / "data" / OUT / "fineweb_edu_10bt.chunk.*.jsonl")
    names = preprocess(shuffled, tmp_path / "tok")
    assert names == [f"processed_data_{i}_text_document.{e}" for i in range(2) for e in ("bin", "idx")]
    ckpt = str(tmp_path / "ckpt")
    overrides = tiny_overrides(str(tmp_path / "tok" / "processed_data_*_text_document*"), ckpt, **{
        "step_scheduler.max_steps": 2, "step_scheduler.val_every_steps": 2, "step_scheduler.ckpt_every_steps": 2,
        "lr_scheduler.lr_warmup_steps": 1,
    })
    r = python("-m", "jaxpretrain.train", *as_flags(overrides))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step 2 |" in r.stdout and "[val] step 2" in r.stdout


def test_stdlib_corpus_rejects_sizes_that_would_write_empty_files(tmp_path):
    from jaxpretrain.data import stdlib_corpus
    from jaxpretrain.errors import UserError

    for argv, expected in [
        (["--max-docs", "0"], "--max-docs: must be at least 1, got 0"),
        (["--max-docs", "-1"], "--max-docs: must be at least 1, got -1"),
        (["--num-files", "0"], "--num-files: must be at least 1, got 0"),
        (["--max-docs", "2", "--num-files", "4"], "--num-files 4: 2 document(s) (--max-docs 2) do not fill every file"),
    ]:
        with pytest.raises(UserError) as error:
            stdlib_corpus.main(["--output", str(tmp_path / "out"), *argv])
        assert str(error.value).startswith(expected), error.value
    assert not (tmp_path / "out").exists()
