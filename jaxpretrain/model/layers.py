"""Building blocks every model family shares: parameters with logical axes, dropout, attention, remat.

Attention lives here once so that the kernel choice (cuDNN flash attention on GPU, XLA elsewhere) and
its dropout handling are the same for every family; a family's attention module computes q, k, v in
its own layout and calls `attention(...)`.
"""

from __future__ import annotations

import functools
import inspect
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpretrain.errors import UserError

ATTENTION_IMPLS = (None, "xla", "cudnn")


def param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter naming its logical axes (see `jaxpretrain.parallel.LOGICAL_AXIS_RULES`).

    eager_sharding=False: modules are built without a mesh; `build.sharded_init` shards them in jit.
    """
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout as torch's: keep with probability 1 - rate, scale kept values by 1 / (1 - rate)."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def check_attention_impl(impl: str | None) -> None:
    if impl not in ATTENTION_IMPLS:
        raise UserError(f"model.attention_impl: {impl!r} is not one of 'xla', 'cudnn', None")


def resolve_attention_impl(impl: str | None, dtype, head_dim: int) -> str:
    """The kernel for jax.nn.dot_product_attention: cuDNN flash attention on GPU in half precision for
    head sizes it supports, else XLA. An explicit "cudnn" where it cannot run is a UserError."""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    on_gpu = jax.default_backend() == "gpu"
    if impl == "cudnn" and not (on_gpu and half):
        raise UserError(
            f"model.attention_impl: 'cudnn' needs a GPU and dtype bfloat16/float16 "
            f"(backend {jax.default_backend()}, dtype {jnp.dtype(dtype).name}); use 'xla' or None"
        )
    if impl is not None:
        return impl
    return "cudnn" if on_gpu and half and head_dim % 8 == 0 and head_dim <= 128 else "xla"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    impl: str | None,
    dtype,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
    dropout_seed: int = 0,
) -> jax.Array:
    """Causal attention over [B, T, heads, head_dim] inputs (k, v may have fewer heads: GQA).

    Without attention dropout this is `jax.nn.dot_product_attention` with the kernel chosen by
    `resolve_attention_impl`, named explicitly (its "auto" would fall back to XLA). With dropout
    (training with attention_dropout > 0, signalled by `dropout_key`): on the cuDNN kernel, cuDNN's
    fused attention with its own dropout (`cudnn_attention_with_dropout`, which draws masks from
    the static `dropout_seed` instead of the key: give each call site its own); elsewhere the
    scores are spelled out as HF's eager attention does (`attention_with_dropout`).
    """
    kernel = resolve_attention_impl(impl, dtype, q.shape[-1])
    if dropout_key is not None and dropout_rate > 0:
        if kernel == "cudnn":
            if cudnn_dropout_kernel() is not None:
                return cudnn_attention_with_dropout(q, k, v, scale=scale, rate=dropout_rate, seed=dropout_seed)
            _warn_no_cudnn_dropout()
        return attention_with_dropout(q, k, v, scale=scale, rate=dropout_rate, key=dropout_key)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation=kernel)


_CUDNN_KWARGS = ("scale", "mask_type", "seed", "dropout_rate", "qkv_layout")


@functools.cache  # once per process, not once per traced layer
def _warn_no_cudnn_dropout() -> None:
    print(f"warning: cuDNN's attention with dropout is not available in jax {jax.__version__} (its private API "
          "changed); attention dropout runs on the spelled-out scores instead (slower)", file=sys.stderr, flush=True)


@functools.cache
def cudnn_dropout_kernel():
    """jax's cuDNN fused attention that takes a dropout rate, or None where this jax has no such
    function with the keywords used here (it is private API: `jax.nn.dot_product_attention` has no
    dropout, so a new jax may move or change it, and attention then falls back, with a warning)."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn
    except ImportError:
        return None
    fn = getattr(cudnn, "dot_product_attention", None)
    if fn is None or not hasattr(cudnn, "MaskType") or not hasattr(cudnn.MaskType, "CAUSAL"):
        return None
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    return fn if all(name in params for name in _CUDNN_KWARGS) else None


def cudnn_attention_with_dropout(q, k, v, *, scale: float, rate: float, seed: int) -> jax.Array:
    """cuDNN flash attention (causal, BTNH) with dropout on the probabilities, fused in the kernel.

    cuDNN draws the masks itself from Philox(seed, offset): `seed` is fixed when the step compiles and
    XLA advances the offset by every execution of the op, separately for the forward and the
    backward op, so the backward pass regenerates the forward's mask. Consequences: call sites need
    distinct seeds (else layers would share masks); a call site must run its forward and backward
    ops equally often, in the same order (true for a layer under grad accumulation and remat, not
    for one op reused by a scan over layers, whose backward walks the layers in reverse); masks
    are not keyed by the step, so a resumed run draws different attention masks than an
    uninterrupted one; and every data-parallel device draws the same masks for its rows.
    """
    kernel = cudnn_dropout_kernel()
    if kernel is None:
        raise RuntimeError(f"jax {jax.__version__} has no cuDNN attention with dropout that takes {_CUDNN_KWARGS}")
    from jax._src.cudnn.fused_attention_stablehlo import MaskType

    return kernel(
        q, k, v, scale=scale, mask_type=MaskType.CAUSAL, seed=int(seed) % 2**31, dropout_rate=float(rate),
        qkv_layout="BTNH",
    )


def attention_with_dropout(q, k, v, *, scale: float, rate: float, key) -> jax.Array:
    """Causal softmax attention with dropout on the probabilities (HF's eager attention)."""
    t, n_heads, n_kv = q.shape[1], q.shape[2], k.shape[2]
    if n_kv != n_heads:  # GQA: each kv head serves n_heads / n_kv query heads
        k, v = (jnp.repeat(x, n_heads // n_kv, axis=2) for x in (k, v))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    causal = jnp.tril(jnp.ones((t, t), bool))
    probs = jax.nn.softmax(jnp.where(causal, scores, jnp.finfo(jnp.float32).min), axis=-1)
    probs = dropout(probs.astype(v.dtype), rate, key)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, start: jax.Array, *, scale: float) -> jax.Array:
    """Generation's attention: q [B, t, heads, head_dim] at positions start .. start + t - 1 over a
    fixed-size cache [B, max_len, kv_heads, head_dim] already holding them; query i sees cache slots
    0 .. start + i (later slots are empty). XLA's kernel: it takes the explicit mask."""
    t, max_len = q.shape[1], k_cache.shape[1]
    mask = jnp.arange(max_len)[None, :] <= start + jnp.arange(t)[:, None]
    return jax.nn.dot_product_attention(q, k_cache, v_cache, mask=mask[None, None], scale=scale, implementation="xla")


def update_cache(cache: dict, k: jax.Array, v: jax.Array, start: jax.Array) -> dict:
    """The layer's {"k", "v"} cache [B, max_len, kv_heads, head_dim] with k, v [B, t, ...] written at start."""
    return {name: jax.lax.dynamic_update_slice_in_dim(cache[name], new.astype(cache[name].dtype), start, axis=1)
            for name, new in (("k", k), ("v", v))}


def check_remat(remat: bool | str) -> None:
    if isinstance(remat, str) and not hasattr(jax.checkpoint_policies, remat):
        raise UserError(f"model.remat: {remat!r} is not a jax.checkpoint_policies policy")


def check_scan_dropout(attention_dropout: float, attention_impl, dtype, head_dim: int) -> None:
    """A layer scan cannot carry cuDNN's attention dropout: its masks follow the order of calls,
    which the scan's backward pass reverses."""
    if (float(attention_dropout or 0.0) > 0 and resolve_attention_impl(attention_impl, dtype, head_dim) == "cudnn"
            and cudnn_dropout_kernel() is not None):  # without it, dropout runs on the spelled-out scores
        raise UserError(
            "model.scan_layers: cuDNN's attention dropout ties its masks to the order of calls, which a layer "
            "scan reverses in the backward pass; set model.dropout=0.0, scan_layers=False or attention_impl='xla'"
        )


def remat_block(block: nnx.Module, x: jax.Array, key: jax.Array | None, remat: bool | str) -> jax.Array:
    """`block(x, key)` with its activations recomputed in the backward pass.

    remat: True (save nothing) or the name of a `jax.checkpoint_policies` policy. Plain jax.checkpoint
    over the block's split state: pure, so it works however the model reached the trace (argument of
    nnx.jit, closure of jax.jit, merged from a State).
    """
    policy = getattr(jax.checkpoint_policies, remat) if isinstance(remat, str) else None
    graphdef, state = nnx.split(block)
    run = jax.checkpoint(lambda s, y, k: nnx.merge(graphdef, s)(y, k), policy=policy)
    return run(state, x, key)


def scan_blocks(blocks, x: jax.Array, keys: list, remat: bool | str = False) -> jax.Array:
    """`for block, key in zip(blocks, keys): x = block(x, key)` as one `lax.scan` over the blocks.

    The parameters stay per layer (checkpoints and HF name tables do not change); they are stacked
    here, inside the traced step, into [n_layer, ...] arrays that the scan slices one layer at a time,
    so XLA compiles one block instead of n_layer. The blocks must be alike up to their parameter
    values: the first block's structure (its static attributes) is used for all of them. `keys`: one
    dropout key per block, or all None. `remat` composes: it wraps the scanned body.
    """
    graphdef, _ = nnx.split(blocks[0])
    stacked = jax.tree.map(lambda *layer: jnp.stack(layer), *(nnx.state(b) for b in blocks))
    use_keys = keys[0] is not None

    def body(h, xs):
        state, key = xs if use_keys else (xs, None)
        return nnx.merge(graphdef, state)(h, key), None

    if remat:
        body = jax.checkpoint(body, policy=getattr(jax.checkpoint_policies, remat) if isinstance(remat, str) else None)
    xs = (stacked, jnp.stack(keys)) if use_keys else stacked
    return jax.lax.scan(body, x, xs)[0]


def padded_size(vocab_size: int, multiple: int) -> int:
    """Rows of an embedding padded to a multiple of `multiple` (1: no padding)."""
    if not isinstance(multiple, int) or multiple < 1:
        raise UserError(f"model.vocab_multiple: must be a positive integer, got {multiple!r}")
    return -(-vocab_size // multiple) * multiple
