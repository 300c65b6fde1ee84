"""Where the time of a jitted step goes: a jax.profiler trace summarised as its top XLA ops.

`jax.profiler.trace(dir)` writes an XSpace protobuf (`*.xplane.pb`); `jax.profiler.ProfileData`
reads it without TensorBoard. On GPU the device plane (`/device:GPU:N`) has an "XLA Ops" line
whose events are the executed HLO ops with their device time; on CPU the host threads carry the
same ops as events with an `hlo_op` stat. Either way each op's events are summed over the traced
steps and ranked by total time.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re


@dataclasses.dataclass(frozen=True)
class OpTime:
    name: str  # the HLO op (fusion, custom-call, collective...) as the profiler names it
    category: str  # a coarse kind from the name: matmul, attention, collective, fusion, ...
    total_ms: float  # device time summed over all traced steps
    count: int  # executions over all traced steps
    share: float  # fraction of all op time in the trace


# Coarse kinds, first match wins; names follow XLA:GPU's op and kernel names.
_CATEGORIES = (
    ("attention", re.compile(r"fmha|flash|cudnn.*attn|dot_product_attention", re.I)),
    ("collective", re.compile(r"all-gather|all-reduce|reduce-scatter|all-to-all|collective|nccl", re.I)),
    ("matmul", re.compile(r"gemm|dot|cublas|matmul|convolution|ynn_fusion|xnn_fusion", re.I)),
    ("copy", re.compile(r"copy|transpose|memcpy|memset|dynamic-update-slice|dynamic-slice", re.I)),
    ("rng", re.compile(r"rng|threefry|random", re.I)),
    ("reduce", re.compile(r"reduce", re.I)),
    ("fusion", re.compile(r"fusion", re.I)),
)


def categorize(name: str) -> str:
    for category, pattern in _CATEGORIES:
        if pattern.search(name):
            return category
    return "other"


def find_xplane(trace_dir: str) -> str:
    found = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(f"{trace_dir}: no *.xplane.pb written by jax.profiler.trace")
    return found[-1]


def op_events(xplane_path: str):
    """(op name, self time in ns) for every executed XLA op in the trace.

    Self time: an op's duration less that of the ops nested inside it on the same timeline (a
    while loop's span holds its body's ops), so no time is counted twice.
    """
    import jax

    data = jax.profiler.ProfileData.from_file(xplane_path)
    timelines = [
        [(e.name, e.start_ns, e.end_ns) for e in line.events]
        for plane in data.planes if plane.name.startswith("/device:")
        for line in plane.lines if line.name == "XLA Ops"
    ]
    if not timelines:
        # CPU (or a device plane without an "XLA Ops" line): ops are the events tagged hlo_op.
        timelines = [
            [(str(stats["hlo_op"]), e.start_ns, e.end_ns) for e in line.events if "hlo_op" in (stats := dict(e.stats or ()))]
            for plane in data.planes for line in plane.lines
        ]
    for events in timelines:
        yield from _self_times(events)


def _self_times(events):
    events = sorted(events, key=lambda e: (e[1], -e[2]))
    stack: list[list] = []  # [name, start, end, child time] of the enclosing ops
    for name, start, end in events:
        while stack and stack[-1][2] <= start:
            done = stack.pop()
            yield done[0], done[2] - done[1] - done[3]
        if stack:
            stack[-1][3] += end - start
        stack.append([name, start, end, 0.0])
    for done in reversed(stack):
        yield done[0], done[2] - done[1] - done[3]


def top_ops(trace_dir: str, top: int = 15) -> tuple[list[OpTime], float]:
    """The `top` ops by total time, and the total op time (ms) of the trace."""
    totals: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.Counter()
    for name, ns in op_events(find_xplane(trace_dir)):
        totals[name] += ns
        counts[name] += 1
    all_ns = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    ops = [OpTime(n, categorize(n), ns / 1e6, counts[n], ns / all_ns) for n, ns in ranked]
    return ops, all_ns / 1e6


def by_category(trace_dir: str) -> dict[str, float]:
    """Total op time (ms) per coarse category, largest first."""
    totals: dict[str, float] = collections.defaultdict(float)
    for name, ns in op_events(find_xplane(trace_dir)):
        totals[categorize(name)] += ns / 1e6
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def format_top_ops(ops: list[OpTime], total_ms: float, steps: int, categories: dict[str, float] | None = None) -> str:
    """A markdown table: op, category, ms per step, share, calls per step."""
    lines = [
        f"Top XLA ops over {steps} traced steps ({total_ms / steps:.1f} ms of op time per step):",
        "",
        "| op | kind | ms/step | share | calls/step |",
        "|---|---|---|---|---|",
    ]
    for op in ops:
        name = op.name if len(op.name) <= 60 else op.name[:57] + "..."
        lines.append(f"| `{name}` | {op.category} | {op.total_ms / steps:.2f} | {100 * op.share:.1f}% | {op.count / steps:g} |")
    if categories:
        lines += ["", "By kind: " + ", ".join(f"{k} {v / steps:.1f} ms ({100 * v / total_ms:.0f}%)" for k, v in categories.items())]
    return "\n".join(lines)


def module_runs(trace_dir: str, module: str) -> list[tuple[int, int]]:
    """(start_ns, end_ns) of every execution of the XLA module whose name contains `module`, in order.

    GPU: the device plane's "XLA Modules" line has one event per execution. CPU: an execution is the
    span of the op events sharing its `run_id`.
    """
    import jax

    data = jax.profiler.ProfileData.from_file(find_xplane(trace_dir))
    runs = [
        (e.start_ns, e.end_ns)
        for plane in data.planes if plane.name.startswith("/device:")
        for line in plane.lines if line.name == "XLA Modules"
        for e in line.events if module in e.name
    ]
    if not runs:
        spans: dict[int, list[int]] = {}
        for plane in data.planes:
            for line in plane.lines:
                for e in line.events:
                    stats = dict(e.stats or ())
                    if "run_id" in stats and module in str(stats.get("hlo_module", "")):
                        span = spans.setdefault(int(stats["run_id"]), [e.start_ns, e.end_ns])
                        span[0], span[1] = min(span[0], e.start_ns), max(span[1], e.end_ns)
        runs = [tuple(s) for s in spans.values()]
    return sorted(runs)


def gaps_between(runs: list[tuple[int, int]]) -> list[float]:
    """Idle time (ms) between consecutive executions: next start minus previous end."""
    return [(b[0] - a[1]) / 1e6 for a, b in zip(runs, runs[1:])]
