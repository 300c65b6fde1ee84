"""Token cross-entropy from the final hidden states, chunked so float32 logits never exist whole.

The plain loss multiplies the hidden states [B, T, D] by the output embedding [V, D] into float32
logits [B, T, V]: for GPT-2 124M at a micro-batch of 32 x 1024 that is 6.6 GB, written and read
again by softmax, its gradient and two matmuls. Here the sequence is cut into chunks of
`chunk_size` positions and a `lax.scan` handles one chunk at a time with its own VJP:

  forward   logits_c = h_c @ W^T (compute dtype in, float32 accumulation), logsumexp, label logit;
            under differentiation also softmax_c = exp(logits_c - lse), dlogits_c = softmax_c -
            onehot, dh_c = dlogits_c @ W and dW^T += h_c^T @ dlogits_c (float32), kept as residuals.
  backward  dh and dW scaled by the incoming cotangent g (the loss is a sum: its VJP is g x grad).

So the largest live buffer is one chunk's float32 logits [B, chunk, V], and the head's matmuls are
the plain loss's three (logits, dh, dW) with no recomputation. Chunks run along the
sequence axis, not over flattened tokens, so a batch sharded over devices stays sharded: every
device works on its own rows of every chunk. Padded vocabulary rows (W's rows from `vocab_size` on)
are masked out of the softmax and get zero gradient; labels equal to -100 count for nothing.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import optax

from jaxpretrain import parallel

IGNORE_INDEX = -100  # labels equal to this contribute no loss and do not count as label tokens


def masked_ce_sum_from_logits(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The plain loss: summed float32 token CE over logits [..., V] and the label-token count."""
    mask = labels != IGNORE_INDEX
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.where(mask, labels, 0))
    return jnp.sum(jnp.where(mask, ce, 0.0)), jnp.sum(mask).astype(jnp.int32)


def masked_ce_sum(
    h: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    *,
    vocab_size: int | None = None,
    chunk_size: int = 128,
    compute_dtype=None,
) -> tuple[jax.Array, jax.Array]:
    """Summed float32 CE of `softmax(h @ w[:vocab_size].T)` against `labels`, and the label count.

    h: [B, T, D] final hidden states (after the last LayerNorm). w: [V_padded, D] output embedding.
    labels: int [B, T], -100 ignored. vocab_size: real vocabulary (rows beyond it are padding; None:
    all rows). chunk_size: sequence positions per chunk (a chunk holds B x chunk_size tokens; T need
    not divide by it). compute_dtype: dtype of the matmul operands (None: h's dtype); accumulation,
    softmax and the result are float32. Gradients flow to h and w in their own dtypes.
    """
    if h.ndim != 3 or labels.shape != h.shape[:2] or w.ndim != 2 or w.shape[1] != h.shape[2]:
        raise ValueError(f"masked_ce_sum: shapes h {h.shape}, w {w.shape}, labels {labels.shape} do not fit")
    vocab_size = w.shape[0] if vocab_size is None else int(vocab_size)
    if not 0 < vocab_size <= w.shape[0]:
        raise ValueError(f"masked_ce_sum: vocab_size {vocab_size} is not in 1..{w.shape[0]}")
    if chunk_size < 1:
        raise ValueError(f"loss_fn.chunk_size: must be positive, got {chunk_size}")
    dtype = jnp.dtype(compute_dtype or h.dtype)
    ce_sum = _chunked_ce(h, w, labels, vocab_size, min(int(chunk_size), h.shape[1]), dtype)
    return ce_sum, jnp.sum(labels != IGNORE_INDEX).astype(jnp.int32)


# ------------------------------------------------------------------------------------------------
# The chunked loss and its VJP
# ------------------------------------------------------------------------------------------------


def _to_chunks(x: jax.Array, chunk: int, fill) -> jax.Array:
    """[B, T, ...] -> [n_chunks, B, chunk, ...], T padded up to a multiple of `chunk` with `fill`."""
    b, t = x.shape[:2]
    n = -(-t // chunk)
    if n * chunk != t:
        x = jnp.pad(x, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)


def _from_chunks(x: jax.Array, t: int) -> jax.Array:
    """[n_chunks, B, chunk, ...] -> [B, T, ...] (the padding dropped)."""
    n, b, chunk = x.shape[:3]
    return jnp.swapaxes(x, 0, 1).reshape(b, n * chunk, *x.shape[3:])[:, :t]


def _chunk_logits(h_c, w):
    """float32 logits [B, chunk, V_padded] (padded vocabulary columns included: see _real_columns)."""
    logits = jnp.einsum("bcd,vd->bcv", h_c, w, preferred_element_type=jnp.float32)
    return parallel.constrain(logits, ("batch", "length", "act_vocab"))


def _real_columns(logits, vocab_size, fill):
    """`logits` with the padded vocabulary columns set to `fill`. Applied where each consumer reads
    the logits (max, exp), so XLA fuses it there instead of writing a masked copy of the logits."""
    if vocab_size == logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, fill)


def _label_logit(logits, labels_c):
    safe = jnp.where(labels_c == IGNORE_INDEX, 0, labels_c)
    return jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]


def _batch_ways(batch: int) -> int:
    """How many ways the traced batch dimension is split over devices (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    spec = parallel.logical_to_mesh_spec(("batch",), (batch,), mesh)
    axes = spec[0] if len(spec) else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in axes)


def _forward(h, w, labels, vocab_size, chunk, dtype, with_grads: bool):
    """The summed CE and, if `with_grads`, its gradients w.r.t. h and w (for a cotangent of 1).

    Layouts are chosen so that no [tokens, vocab] array is ever transposed: dW is accumulated as
    dW^T [D, V] (h^T @ dlogits) and transposed once at the end. With the batch split n ways over
    devices, dW^T is accumulated as n per-device partial sums [n, D, V] (each device adds its own
    rows' part) and summed once after the loop: a replicated carry would make XLA all-reduce the
    whole [D, V] after every chunk.
    """
    ways = _batch_ways(h.shape[0])
    # One all-gather of W (FSDP shards its embed dimension) before the loop, not one per chunk.
    wc = parallel.constrain(w.astype(dtype), ("act_vocab", None))
    hs, ls = _to_chunks(h.astype(dtype), chunk, 0), _to_chunks(labels, chunk, IGNORE_INDEX)

    def body(carry, xs):
        total, dwt = carry
        h_c, labels_c = xs
        logits = _chunk_logits(h_c, wc)
        keep = labels_c != IGNORE_INDEX
        if not with_grads:
            lse = jax.nn.logsumexp(_real_columns(logits, vocab_size, -jnp.inf), axis=-1)
            return (total + jnp.sum(jnp.where(keep, lse - _label_logit(logits, labels_c), 0.0)), dwt), None
        # logsumexp by hand, so that exp(logits - max) is computed once and serves the softmax too.
        top = jnp.max(_real_columns(logits, vocab_size, -jnp.inf), axis=-1, keepdims=True)
        e = _real_columns(jnp.exp(logits - top), vocab_size, 0.0)
        s = jnp.sum(e, axis=-1, keepdims=True)
        lse = (top + jnp.log(s))[..., 0]
        total = total + jnp.sum(jnp.where(keep, lse - _label_logit(logits, labels_c), 0.0))
        # d(lse - logit[label]) / dlogits = softmax - onehot.
        onehot = jax.nn.one_hot(jnp.where(keep, labels_c, -1), w.shape[0], dtype=jnp.float32)
        dlogits = jnp.where(keep[..., None], e / s - onehot, 0.0).astype(dtype)
        dh_c = jnp.einsum("bcv,vd->bcd", dlogits, wc, preferred_element_type=jnp.float32)
        split = lambda x: x.reshape(ways, x.shape[0] // ways, *x.shape[1:])  # noqa: E731  rows by device
        part = jnp.einsum("nbcd,nbcv->ndv", split(h_c), split(dlogits), preferred_element_type=jnp.float32)
        dwt = dwt + parallel.constrain(part, ("batch", None, "act_vocab"))
        return (total, dwt), dh_c.astype(h.dtype)

    dwt0 = None
    if with_grads:
        dwt0 = parallel.constrain(jnp.zeros((ways, *w.shape[::-1]), jnp.float32), ("batch", None, "act_vocab"))
    (total, dwt), dhs = jax.lax.scan(body, (jnp.zeros((), jnp.float32), dwt0), (hs, ls))
    if not with_grads:
        return total, None
    return total, (_from_chunks(dhs, h.shape[1]), parallel.constrain(dwt.sum(0).T, ("act_vocab", None)))


# The gradient is computed in the forward pass, while each chunk's logits are at hand (Liger
# Kernel's fused linear cross-entropy does the same): the backward pass only scales it by the
# incoming cotangent, so the head costs three matmuls (logits, dh, dW) as in the plain loss,
# not four with a recomputation. Outside differentiation (eval) only the loss is computed.
@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked_ce(h, w, labels, vocab_size, chunk, dtype):
    return _forward(h, w, labels, vocab_size, chunk, dtype, with_grads=False)[0]


def _chunked_ce_fwd(h, w, labels, vocab_size, chunk, dtype):
    total, (dh, dw) = _forward(h, w, labels, vocab_size, chunk, dtype, with_grads=True)
    return total, (dh, dw, jnp.zeros((0,), w.dtype))  # the empty array carries w's dtype


def _chunked_ce_bwd(vocab_size, chunk, dtype, residuals, g):
    dh, dw, w_dtype = residuals
    # Integer labels take no cotangent (None = zero).
    return (g * dh.astype(jnp.float32)).astype(dh.dtype), (g * dw).astype(w_dtype.dtype), None


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)
