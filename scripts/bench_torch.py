"""The torch baseline of `python -m jaxpretrain.bench`, on the same config and the same flags.

    python scripts/bench_torch.py --config configs/gpt2.py[:preset] [--steps N] [--warmup N] [--json]
        [--config.section.field=value ...] [--compile=false]

transformers' `GPT2LMHeadModel` built from a GPT2Config of the recipe's shape (HF's own vocabulary,
no padding), `torch.optim.AdamW` (fused on GPU) with the recipe's betas, eps and weight decay, the
recipe's gradient accumulation (each micro-batch's summed float32 CE divided by the label tokens of the
whole global batch), `clip_grad_norm_` and the warmup-cosine schedule. On GPU: bf16 autocast, SDPA
attention and `torch.compile` (its first step, timed as compile). On CPU: float32, SDPA, eager.
Synthetic tokens as ours. Prints the same fields as jaxpretrain.bench; the last line is `<X> tokens/s`.
"""

from __future__ import annotations

import os
import resource
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxpretrain.bench import argparse_like, bench_flags, mfu, print_report  # noqa: E402  (no jax imported)
from jaxpretrain.errors import UserError, run_cli  # noqa: E402
from jaxpretrain.train.metrics import PEAK_FLOPS  # noqa: E402

SHAPE_FIELDS = ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")


def gpt2_config(cfg):
    """The HF GPT2Config of the recipe's model section (built-in 124M or a directory, plus overrides)."""
    from transformers import GPT2Config

    m = cfg.model
    name = m.pretrained_model_name_or_path
    config = GPT2Config() if name in ("gpt2", "openai-community/gpt2") and not os.path.exists(name) else GPT2Config.from_pretrained(name)
    for field in SHAPE_FIELDS:
        if m[field] is not None:
            setattr(config, field, int(m[field]))
    if m.dropout is not None:
        config.embd_pdrop = config.attn_pdrop = config.resid_pdrop = float(m.dropout)
    return config


def lr_lambda(cfg):
    """Megatron's warmup-cosine (jaxpretrain.train.schedule, tested equal to NeMo Automodel's) as a factor."""
    from jaxpretrain.train.schedule import from_config

    schedule = from_config(cfg)
    return lambda step: schedule.value(step) / schedule.max_lr


def peak_flops(device_name: str) -> float | None:
    return next((f for prefix, f in PEAK_FLOPS.items() if device_name.startswith(prefix)), None)


def bench(cfg, args) -> dict:
    from transformers import GPT2LMHeadModel

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    ss = cfg.step_scheduler
    global_batch, micro = int(ss.global_batch_size), int(ss.local_batch_size)
    if global_batch % micro:
        raise UserError(f"step_scheduler.global_batch_size: {global_batch} is not a multiple of local_batch_size {micro}")
    grad_accum = global_batch // micro
    seq = int(cfg.dataset.seq_length)

    config = gpt2_config(cfg)
    config._attn_implementation = "sdpa"
    torch.manual_seed(int(cfg.rng.seed))
    model = GPT2LMHeadModel(config).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())  # tied wte counted once, as HF counts
    n_params_no_pos = n_params - model.transformer.wpe.weight.numel()
    fpt = 6.0 * n_params_no_pos + 12.0 * config.n_layer * config.n_embd * seq  # 6N + 12 L H Q T (H Q = n_embd)

    opt = cfg.optimizer
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=float(opt.lr), betas=tuple(float(b) for b in opt.betas), eps=float(opt.eps),
        weight_decay=float(opt.weight_decay), fused=on_gpu,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    compiled = torch.compile(model) if on_gpu and args.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False)

    rng = np.random.default_rng(0)
    tokens = torch.from_numpy(rng.integers(0, config.vocab_size, size=(global_batch, seq + 1)).astype(np.int64)).to(device)
    input_ids, labels = tokens[:, :-1], tokens[:, 1:]

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        denom = (labels != -100).sum().clamp(min=1).float()
        loss_sum = torch.zeros((), device=device)
        for m in range(grad_accum):
            ids, lab = input_ids[m * micro:(m + 1) * micro], labels[m * micro:(m + 1) * micro]
            with autocast:
                logits = compiled(ids).logits
            ce = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=-100, reduction="sum"
            )
            loss = ce / denom
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float(opt.max_grad_norm))
        optimizer.step()
        scheduler.step()
        return loss_sum, grad_norm

    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    start = time.perf_counter()
    loss, _ = train_step()  # on GPU: torch.compile's tracing and autotuning happen here
    sync()
    compile_s = time.perf_counter() - start
    for _ in range(max(args.warmup - 1, 0)):
        train_step()
    sync()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        loss, _ = train_step()
    loss = float(loss)
    sync()
    elapsed, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start

    tps = args.steps * global_batch * seq / elapsed
    kind = torch.cuda.get_device_name() if on_gpu else "cpu"
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "bench": "torch",
        "device_kind": kind,
        "devices": 1,
        "params": int(n_params),
        "global_batch": global_batch,
        "micro_batch": micro,
        "grad_accum": grad_accum,
        "seq": seq,
        "options": {
            "dtype": "bfloat16-autocast" if on_gpu else "float32",
            "dropout": config.resid_pdrop,
            "attention": "sdpa",
            "compile": bool(on_gpu and args.compile),
            "torch": torch.__version__,
        },
        "compile_s": compile_s,
        "steps": args.steps,
        "step_ms": 1000 * elapsed / args.steps,
        "cpu_ms_per_step": 1000 * cpu_s / args.steps,
        "tokens_per_s": tps,
        "tokens_per_s_per_device": tps,
        "flops_per_token": fpt,
        "mfu": mfu(tps, fpt, 1, peak_flops(kind)),
        "peak_mem_gib": peak_mem,
        "temp_gib": None,
        "loss": loss,
    }


def main(argv=None) -> int:
    from jaxpretrain.config.cli import Flag
    from jaxpretrain.train.__main__ import parse_config

    flags = tuple(f for f in bench_flags() if not f.name.startswith("profile") and f.name != "top")
    flags += (Flag("compile", bool, True, "GPU: torch.compile the model (--compile=false: eager)"),)
    parsed = parse_config(
        list(sys.argv[1:] if argv is None else argv), prog="python scripts/bench_torch.py", flags=flags,
        description="The torch baseline of jaxpretrain.bench: transformers' GPT-2 + torch AdamW on the same config.",
    )
    args = argparse_like({"profile_steps": 1, "top": 1, **parsed.flags})
    print_report(bench(parsed.cfg, args), args.json)
    return 0


if __name__ == "__main__":
    run_cli(main)
