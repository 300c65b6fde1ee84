"""Markdown tables from the JSON lines of jaxpretrain.bench / scripts/bench_torch.py runs.

    python scripts/bench_table.py results.jsonl [--skipped "name1 name2"]

One row per run (gpu_bench.sh adds a "run" name to each line; failed runs are lines with "failed"),
the speedups that issue 11 asks about, and the profile of the run that was traced (--profile).
"""

from __future__ import annotations

import argparse
import json

SEED_TOKENS_PER_GPU = 72_000  # the seed's own log (2 GPUs, FSDP2)
LLMC_TOKENS_PER_GPU = 468_000  # llm.c on 8 x H100
TARGET = 550_000  # issue 11's target per H100/H200


def describe(r: dict) -> str:
    o = r.get("options", {})
    parts = [f"micro {r['micro_batch']} x {r['seq']}, accum {r['grad_accum']}"]
    parts += [f"{k} {v}" for k, v in o.items() if k not in ("torch",)]
    if r.get("attention_kernels"):  # ours: the kernels found in the compiled step
        parts.append("kernels " + "+".join(r["attention_kernels"]))
    return ", ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("--skipped", default="")
    p.add_argument("--checks", nargs="*", default=[], help="test parts and their outcome, printed as notes")
    args = p.parse_args()
    with open(args.results) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    ok = [r for r in rows if "tokens_per_s" in r]
    if ok:
        first = ok[0]
        print(f"{first['devices']}x {first['device_kind']}, {first['params']:,} parameters, global batch "
              f"{first['global_batch']} x {first['seq']}; MFU = tokens/s x 6N + 12*L*H*Q*T FLOPs per token "
              f"({first['flops_per_token'] / 1e6:.0f} MFLOP) / (devices x dense bf16 peak)")
        print()
    print("| run | configuration | compile | step | tokens/s | per device | MFU | peak mem | loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = r.get("run", r.get("bench", "?"))
        if "tokens_per_s" not in r:
            print(f"| {name} | failed (exit {r.get('failed')}) | | | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        print(f"| {name} | {r['bench']}: {describe(r)} | {r['compile_s']:.1f} s | {r['step_ms']:.1f} ms | "
              f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_device']:,.0f} | {mfu} | {r['peak_mem_gib']:.1f} GiB | {r['loss']:.4f} |")
    for name in args.skipped.split():
        print(f"| {name} | skipped (time budget) | | | | | | | |")

    ours = [r for r in ok if r["bench"] == "jaxpretrain"]
    torch_rows = [r for r in ok if r["bench"] == "torch"]
    if ours:
        best = max(ours, key=lambda r: r["tokens_per_s_per_device"])
        print()
        print(f"Fastest: {best.get('run')} at {best['tokens_per_s_per_device']:,.0f} tokens/s per device "
              f"({best['tokens_per_s_per_device'] / TARGET:.2f}x the 550,000 target, "
              f"{best['tokens_per_s_per_device'] / LLMC_TOKENS_PER_GPU:.2f}x llm.c's 468,000).")
        recipe = next((r for r in ours if r.get("run") == "recipe"), None)
        if recipe:
            print(f"The seed's recipe (dropout 0.1): {recipe['tokens_per_s_per_device']:,.0f} tokens/s per device = "
                  f"{recipe['tokens_per_s_per_device'] / SEED_TOKENS_PER_GPU:.1f}x the seed's 72,000.")
        for t in torch_rows:
            # The run of ours that the torch run copies: the same name without "torch-" (default flags).
            twin = next((r for r in ours if "torch-" + str(r.get("run")) == t.get("run")), None)
            if twin:
                print(f"Same shape as {t.get('run')}: ours ({twin.get('run')}) {twin['tokens_per_s'] / t['tokens_per_s']:.2f}x torch "
                      f"({twin['tokens_per_s']:,.0f} vs {t['tokens_per_s']:,.0f} tokens/s).")
        base = ours[0].get("xla_flags", "")
        print(f"XLA_FLAGS (after jaxpretrain's GPU defaults) of {ours[0].get('run')} and the runs not listed: `{base or '(none)'}`")
        for r in ours[1:]:
            if r.get("xla_flags", "") != base:
                print(f"XLA_FLAGS of {r.get('run')}: `{r.get('xla_flags') or '(none)'}`")
    if [c for c in args.checks if c]:
        print()
        print("Checks: " + "; ".join(c for c in args.checks if c))
    for r in ok:
        if r.get("profile_error"):
            print()
            print(f"Profile of {r.get('run')}: not taken ({r['profile_error']}); its timings stand.")
    traced = [r for r in ok if r.get("profile_top_ops")]
    for r in traced:
        print()
        print(f"Profile of {r.get('run')} (top XLA ops by device time per step):")
        print()
        print("| op | kind | ms/step | share |")
        print("|---|---|---|---|")
        for op in r["profile_top_ops"]:
            name = op["name"] if len(op["name"]) <= 60 else op["name"][:57] + "..."
            print(f"| `{name}` | {op['kind']} | {op['ms_per_step']:.2f} | {100 * op['share']:.1f}% |")


if __name__ == "__main__":
    main()
