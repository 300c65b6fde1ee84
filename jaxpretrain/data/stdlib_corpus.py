"""The embedded default corpus: CPython's standard library sources as FineWeb-Edu-style JSONL.

Every machine with Python has them, so tests, the quick start and benchmarks get real text (tens of
megabytes of code, prose in docstrings, some unicode) with no download. One document per `.py` file,
`{"text": ..., "id": ..., "url": <file path>}` per line, in sorted path order, split into a few
`stdlib_py.chunk.NNNNN.jsonl` files like the seed's `fineweb_edu_10bt.chunk.*.jsonl`.
The content is deterministic for a given Python installation (it differs between Python versions).
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig

from jaxpretrain.errors import UserError, run_cli

CHUNK_NAME = "stdlib_py.chunk.{:05d}.jsonl"
# Installed third-party code lives under the stdlib directory too; it is not part of the corpus.
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_sources() -> list[str]:
    """Paths of the standard library's `.py` files, sorted by their path relative to the stdlib."""
    root = stdlib_dir()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return [os.path.join(root, rel) for rel in sorted(found)]


def _documents(max_docs: int | None):
    """(id, path, text) of every non-empty, valid UTF-8 source file, up to max_docs of them."""
    root = stdlib_dir()
    count = 0
    for path in stdlib_sources():
        if max_docs is not None and count >= max_docs:
            return
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # a few test files are deliberately in other encodings
        if not text.strip():
            continue
        count += 1
        yield "stdlib/" + os.path.relpath(path, root).replace(os.sep, "/"), path, text


def _chunk_lines(lines: list[str], num_files: int) -> list[list[str]]:
    sizes = [len(line) for line in lines]
    total = sum(sizes) or 1
    chunks: list[list[str]] = [[] for _ in range(num_files)]
    written = 0
    for line, size in zip(lines, sizes):
        # Chunk by the byte position of the document's middle: contiguous and about equal in size.
        index = min(num_files - 1, (written + size // 2) * num_files // total)
        chunks[index].append(line)
        written += size
    return chunks


def write_stdlib_jsonl(out_dir: str, *, num_files: int = 4, max_docs: int | None = None) -> list[str]:
    """Write the corpus as `num_files` JSONL chunks in `out_dir`; returns their paths in order.

    Documents are split contiguously (sorted order kept) into chunks of about equal size in bytes.
    Each chunk is written under a temporary name and renamed, so a chunk that exists is complete.
    """
    if num_files < 1:
        raise UserError(f"--num-files: must be at least 1, got {num_files}")
    if max_docs is not None and max_docs < 1:
        raise UserError(f"--max-docs: must be at least 1, got {max_docs}")
    lines = [
        json.dumps({"text": text, "id": doc_id, "url": path}, ensure_ascii=False) + "\n"
        for doc_id, path, text in _documents(max_docs)
    ]
    chunks = _chunk_lines(lines, num_files)
    # An empty chunk file would become an empty .bin/.idx pair downstream: a corpus too small to split.
    if not all(chunks):
        raise UserError(
            f"--num-files {num_files}: {len(lines)} document(s) (--max-docs {max_docs}) do not fill every file; "
            "give fewer files or more documents"
        )
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out_dir}: cannot create output directory ({e.strerror})") from None

    paths = []
    for i, chunk in enumerate(chunks):
        path = os.path.join(out_dir, CHUNK_NAME.format(i))
        partial = path + ".partial"
        try:
            with open(partial, "w", encoding="utf-8") as f:
                f.writelines(chunk)
            os.replace(partial, path)
        except OSError as e:
            raise UserError(f"{path}: cannot write ({e.strerror})") from None
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxpretrain.data.stdlib_corpus",
        description="Write CPython's standard library sources as FineWeb-Edu-style JSONL chunks.",
    )
    parser.add_argument("--output", required=True, help="directory for stdlib_py.chunk.*.jsonl")
    parser.add_argument("--num-files", type=int, default=4, help="number of chunk files (default 4)")
    parser.add_argument("--max-docs", type=int, default=None, help="stop after this many documents (default: all)")
    args = parser.parse_args(argv)
    paths = write_stdlib_jsonl(args.output, num_files=args.num_files, max_docs=args.max_docs)
    total = sum(os.path.getsize(p) for p in paths)
    for p in paths:
        print(p)
    print(f"wrote {len(paths)} files, {total / 1e6:.1f} MB", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
