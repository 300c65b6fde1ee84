"""Field documentation from the config files themselves: the comment lines above each assignment.

`c.model.n_layer = ...` or `d.paths = ...` (with `d = c.dataset` earlier in the same function) is
documented by the `#` lines right above it; assignments that follow one another with no blank line or
comment between them share that comment (a block such as GPT-2's four shape overrides). Read with `ast`
and `tokenize`, never imported, so `--help` stays fast.
"""

from __future__ import annotations

import ast
import io
import tokenize


def _comments(source: str) -> dict[int, str]:
    """line number -> comment text (without '#') for every comment-only line."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.line.strip().startswith("#"):
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _chain(node: ast.AST) -> list[str] | None:
    """`a.b.c` -> ["a", "b", "c"]; `a["b"]` counts as `a.b`; anything else: None."""
    parts = []
    while True:
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            parts.append(node.slice.value)
            node = node.value
        elif isinstance(node, ast.Name):
            parts.append(node.id)
            return parts[::-1]
        else:
            return None


def field_docs(source: str) -> dict[str, tuple[str, int]]:
    """Documented assignments of a config source: key -> (comment, line).

    Keys are the assignment's attribute path below the config root, with aliases resolved within a
    function (`d = c.dataset; d.paths = ...` gives "dataset.paths"); a path whose root is a function's
    own fresh ConfigDict (`m = ConfigDict(); m.dtype = ...` in `model_section()`) keeps only the field
    ("dtype"), which the help resolves by section.
    """
    comments = _comments(source)
    lines = source.splitlines()
    docs: dict[str, tuple[str, int]] = {}
    for func in [n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.FunctionDef, ast.Module))]:
        aliases: dict[str, list[str]] = {}
        block_doc, last_line = None, -2
        body = [n for n in func.body if isinstance(n, (ast.Assign, ast.AnnAssign))] if isinstance(func, ast.FunctionDef) else []
        for stmt in body:
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            chain = _chain(targets[0])
            if chain is None:
                continue
            if len(chain) == 1:  # `d = c.dataset`: an alias for a section
                value = _chain(stmt.value) if isinstance(stmt.value, (ast.Attribute, ast.Name, ast.Subscript)) else None
                if value and value[0] in aliases:
                    aliases[chain[0]] = aliases[value[0]] + value[1:]
                else:  # a fresh section (or the root): its fields are named below it
                    aliases[chain[0]] = value[1:] if value else []
                continue
            root, rest = chain[0], chain[1:]
            path = aliases.get(root, []) + rest
            # The comment block directly above, else the block this line continues.
            above, i = [], stmt.lineno - 1
            while i in comments:
                above.insert(0, comments[i])
                i -= 1
            if above:
                block_doc = " ".join(above)
            elif stmt.lineno - 1 > last_line or not lines[stmt.lineno - 2].strip():
                block_doc = None
            last_line = getattr(stmt, "end_lineno", stmt.lineno)
            if block_doc:
                docs[".".join(path)] = (block_doc, stmt.lineno)
    return docs


def lookup(docs: dict[str, tuple[str, int]], path: str) -> tuple[str, int] | None:
    """The documentation of a leaf "section.field": by full path, else by the field inside its
    section-building function (e.g. "dtype" for "model.dtype")."""
    if path in docs:
        return docs[path]
    return docs.get(path.split(".", 1)[-1])
