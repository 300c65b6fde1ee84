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
    """Bytes one device holds while the train step runs, from XLA's buffer assignment."""

    arguments: int    # state + batch passed in
    outputs: int      # new state + metrics
    aliased: int      # outputs written over donated arguments (counted once)
    temporaries: int  # activations, gradients, scratch: one buffer, reuse already planned inside
    code: int         # the compiled program

    @property
    def total(self) -> int:
        """What the device must hold at once (MaxText's "total memory size" of a compiled step)."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @classmethod
    def of(cls, compiled) -> "StepMemory | None":
        analysis = compiled.memory_analysis()
        if analysis is None:
            return None
        if isinstance(analysis, (list, tuple)):  # one entry per device program on some backends
            analysis = analysis[0]
        return cls(
            int(analysis.argument_size_in_bytes), int(analysis.output_size_in_bytes), int(analysis.alias_size_in_bytes),
            int(analysis.temp_size_in_bytes), int(getattr(analysis, "generated_code_size_in_bytes", 0) or 0),
        )


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
    if need is None or limit is None or need.total <= limit:
        return need
    raise UserError(
        f"step_scheduler.local_batch_size: the train step needs about {size(need.total)} per device "
        f"(state and batch {size(need.arguments)}, temporaries {size(need.temporaries)}), more than the "
        f"{size(limit)} {getattr(device, 'device_kind', 'device')} can give; {advice}"
    )


def size(n: int) -> str:
    """Bytes for people: GiB from a tenth of one up, MiB below."""
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"
