"""Will the train step fit in device memory? Asked of the compiler before step 1, not of the device.

`jitted.lower(...).compile()` runs XLA's buffer assignment ahead of time; its `memory_analysis()` is
what one device will hold while the step runs (the live state, the batch, the outputs and the
temporaries). That is compared with what the device can give, `memory_stats()["bytes_limit"]`
(on GPU the allocator's pool: XLA_PYTHON_CLIENT_MEM_FRACTION of the memory). On CPU neither is
reported, and the check passes. The compiled step is the one the loop then runs: jit's cache reuses
it, so asking costs no second compilation.
"""

from __future__ import annotations

import dataclasses

from jaxpretrain.errors import UserError

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes one device needs for one train step, from XLA's buffer assignment."""

    arguments: int   # state + batch passed in
    outputs: int     # new state + metrics
    aliased: int     # outputs written over donated arguments (counted once)
    temporaries: int  # activations, gradients, scratch
    peak: int        # XLA's peak of live buffers when it reports one, else the (larger) sum above

    @classmethod
    def of(cls, compiled) -> "StepMemory | None":
        analysis = compiled.memory_analysis()
        if analysis is None:
            return None
        if isinstance(analysis, (list, tuple)):  # one entry per device program on some backends
            analysis = analysis[0]
        arguments = int(analysis.argument_size_in_bytes)
        outputs = int(analysis.output_size_in_bytes)
        aliased = int(analysis.alias_size_in_bytes)
        temporaries = int(analysis.temp_size_in_bytes)
        total = arguments + outputs - aliased + temporaries + int(getattr(analysis, "generated_code_size_in_bytes", 0))
        peak = int(getattr(analysis, "peak_memory_in_bytes", 0) or 0)
        return cls(arguments, outputs, aliased, temporaries, peak or total)


def device_limit(device) -> int | None:
    """The bytes the allocator may use on `device`, None where the backend does not say (CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None


def check_fits(compiled, device, *, limit: int | None = None, advice: str) -> StepMemory | None:
    """Raise a UserError with the estimate and `advice` when the step needs more than `limit` bytes
    (default: the device's). Returns the estimate (None if the backend gives none)."""
    need = StepMemory.of(compiled)
    limit = device_limit(device) if limit is None else limit
    if need is None or limit is None or need.peak <= limit:
        return need
    raise UserError(
        f"step_scheduler.local_batch_size: the train step needs about {need.peak / GIB:.2f} GiB per device "
        f"(state and batch {need.arguments / GIB:.2f}, temporaries {need.temporaries / GIB:.2f}), more than the "
        f"{limit / GIB:.2f} GiB {getattr(device, 'device_kind', 'device')} can give; {advice}"
    )
