"""The math of every DiT / SD3 / FLUX block, written once.

``ditfast.nn``'s modules and the diffusers integration (``ditfast.integrations``) both run these
functions; they differ only in the modules and weights they pass:

* Linear and MLP layers are callables, called as modules (so LoRA / PEFT wrappers, quantized
  linears and forward hooks keep working in patched diffusers models).
* A q/k/v projection (:data:`QKV`) is one packed Linear whose output is ``[q | k | v]`` (ditfast.nn;
  diffusers after ``fuse_qkv_projections()``) or a ``(to_q, to_k, to_v)`` triple; either way q, k
  and v are strided (B, L, H, Dh) views of the projection outputs (:func:`qkv_heads`, no copies).
* Modulation vectors arrive already chunked, in the upstream order (shift, scale, gate, ...),
  each (B, D).
* Every attention goes through :func:`attend`, the only place a block calls an attention op.

Joint attention orders the streams text / context first (FLUX, the SD3.5 reference); diffusers' SD3
processor puts the image first, which only changes the order of the softmax's sums.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import ops
from ..parallel.heads import check_qkv_heads

Tensor = torch.Tensor
Module = Callable[[Tensor], Tensor]
QKV = Union[Module, Tuple[Module, Module, Module]]
Rope = Optional[Tuple[Tensor, Tensor]]
# the attention of prepared joint q, k, v (B, L, H, Dh) -> (B, L, H, Dh); None: ops.joint_attention
Attention = Optional[Callable[[Tensor, Tensor, Tensor], Tensor]]

__all__ = ["Stream", "qkv_heads", "attend", "dit_block", "flux_double", "flux_single", "sd3_joint", "final_layer",
           "unhooked", "plain_linear", "linear_of_concat", "linear_gelu_tanh", "linears_of_one_input",
           "linear_gelu_tail", "linear_split", "sandwich_block", "parallel_block", "cross_block", "CrossKV"]


class Stream(NamedTuple):
    """The modules and weights of one token stream of a block.

    qkv: the q/k/v projection (:data:`QKV`). proj: the attention output projection (None for SD3's
    pre-only context). mlp: the MLP applied to the modulated residual (None for a pre-only context;
    for FLUX's single block see :func:`flux_single`). q_norm, k_norm: the per-head QK-RMSNorm
    weights (Dh,), both None for no QK-norm. eps: the eps of the LayerNorm before attention, eps2
    the one before the MLP.
    """

    qkv: QKV
    proj: Optional[Module] = None
    mlp: Optional[Module] = None
    q_norm: Optional[Tensor] = None
    k_norm: Optional[Tensor] = None
    eps: float = 1e-6
    eps2: float = 1e-6


def qkv_heads(qkv: QKV, h: Tensor, head_dim: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Project ``h`` (B, L, D) and split into heads: q, k, v, each a strided (B, L, H, Dh) view.

    qkv: one packed Linear, output (B, L, 3·H·Dh) = ``[q | k | v]``, or a (to_q, to_k, to_v) triple.
    """
    if isinstance(qkv, tuple):  # separate projections of one input: one backward (linears_of_one_input)
        return tuple(o.unflatten(-1, (-1, head_dim)) for o in linears_of_one_input(qkv, h))
    out = qkv(h)
    # a packed projection must hold whole heads, and a DTensor weight must be split per rank as
    # [q_r | k_r | v_r] (ditfast.parallel.tensor_parallel), never contiguously (a plain ColwiseParallel)
    check_qkv_heads(out.shape[-1], out.shape[-1] // (3 * head_dim), head_dim, getattr(qkv, "weight", None))
    return out.unflatten(-1, (3, -1, head_dim)).unbind(-3)


def attend(qs: Sequence[Tensor], ks: Sequence[Tensor], vs: Sequence[Tensor], *,
           q_weights: Optional[Sequence[Optional[Tensor]]] = None,
           k_weights: Optional[Sequence[Optional[Tensor]]] = None, rope: Rope = None,
           eps: float = 1e-6, attention: Attention = None, key_lengths=None) -> Tuple[Tensor, ...]:
    """One attention over the joint sequence ``[stream 0; stream 1; ...]``; per stream its (B, L_i, H·Dh) output.

    qs, ks, vs: one (B, L_i, H, Dh) tensor per stream (strided views of the projections), before
    QK-norm and RoPE. q_weights, k_weights: one RMSNorm weight (Dh,) or None per stream (or None:
    no QK-norm anywhere); eps: their eps. rope: the fp32 (cos, sin) of the joint sequence
    (``ops.rope_freqs`` layout, FLUX's interleaved pairs), or None. attention: what attends the
    prepared joint q, k, v (default ``ops.joint_attention``); the diffusers integration passes
    context-parallel attention here (ditfast/integrations/_context_parallel.py). key_lengths: per sample,
    the valid (prefix) keys of the joint sequence (``ops.joint_attention``; default attention only).
    """
    if q_weights is not None and all(w is None for w in q_weights) and all(w is None for w in k_weights):
        q_weights = k_weights = None
    if attention is None and len(qs) == 1 and q_weights is None and rope is None:  # nothing to prepare
        return (ops.joint_attention(qs[0], ks[0], vs[0], key_lengths=key_lengths).flatten(2),)
    outs = ops.joint_attention_streams(tuple(qs), tuple(ks), tuple(vs), q_weights=q_weights,
                                       k_weights=k_weights, rope=rope, eps=eps, attention=attention,
                                       key_lengths=key_lengths)
    return tuple(o.flatten(2) for o in outs)


def _attend_streams(streams: Sequence[Stream], qkvs, rope: Rope, eps: float,
                    attention: Attention = None, key_lengths=None) -> Tuple[Tensor, ...]:
    qs, ks, vs = zip(*qkvs)
    return attend(qs, ks, vs, q_weights=tuple(s.q_norm for s in streams),
                  k_weights=tuple(s.k_norm for s in streams), rope=rope, eps=eps, attention=attention,
                  key_lengths=key_lengths)


# ------------------------------------------------------------------------------------------------
# Linear layers ditfast may run as matmuls (only plain nn.Linear; every other layer is called)
# ------------------------------------------------------------------------------------------------
def unhooked(m: nn.Module) -> bool:
    """No forward / backward hooks on ``m`` (its own or global) and no instance ``forward``."""
    from torch.nn.modules import module as M

    own = (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)
    glob = (M._global_forward_hooks, M._global_forward_pre_hooks, M._global_backward_hooks,
            M._global_backward_pre_hooks)
    return not any(own) and not any(glob) and "forward" not in m.__dict__


def plain_linear(m) -> bool:
    """True when ``m`` is exactly ``torch.nn.Linear`` -- not a subclass (LoRA / PEFT and quantized layers
    are subclasses or other classes), without hooks (its own or global), parametrizations or an
    instance ``forward``, whose weight is a plain tensor (not a DTensor or a quantized tensor subclass),
    outside autocast. Only then may ditfast run its matmuls itself (:func:`linear_of_concat`,
    :func:`linear_gelu_tanh`); any other layer is called as a module."""
    from torch.nn.utils.parametrize import is_parametrized
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if type(m) is not nn.Linear or not unhooked(m) or is_parametrized(m):
        return False

    w = m.weight
    return not is_traceable_wrapper_subclass(w) and not torch.is_autocast_enabled(w.device.type)


def _plain_tensor(t: Tensor) -> bool:
    """Not a tensor subclass that wraps others (a DTensor activation takes the module path)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return not is_traceable_wrapper_subclass(t)


class _LinearOfTwo(torch.autograd.Function):
    """``cat((a, b), -1) @ Wᵀ + bias`` as two accumulating matmuls over the column blocks of W (no
    concatenated copy); 2-D parts (T, K_a), (T, K_b). Backward: each part's gradient ``dY · W_i``; the
    weight gradient's column blocks ``dYᵀ · part_i`` written straight into one (N, K_a + K_b) tensor (its
    strided column views; cuBLAS takes them with no copy); the bias gradient ``Σ_T dY``.

    The arity is fixed (no ``*parts``): Dynamo inlines ``forward`` when no input needs a gradient
    (inference under torch.compile) and mis-binds a variadic signature there (``ctx`` receives the
    weight), on torch 2.11 to 2.14 at least."""

    @staticmethod
    def forward(ctx, weight, bias, a, b):
        ctx.has_bias = bias is not None
        ctx.save_for_backward(weight, a, b)
        ka = a.shape[-1]
        wa, wb = weight[:, :ka].t(), weight[:, ka:].t()
        out = torch.mm(a, wa) if bias is None else torch.addmm(bias, a, wa)
        return out.addmm_(b, wb)  # beta = 1: accumulate (reads and writes the (T, N) output once more)

    @staticmethod
    def backward(ctx, dy):
        weight, a, b = ctx.saved_tensors
        ka = a.shape[-1]
        wa, wb = weight[:, :ka], weight[:, ka:]
        da = torch.mm(dy, wa) if ctx.needs_input_grad[2] else None
        db_ = torch.mm(dy, wb) if ctx.needs_input_grad[3] else None
        dw = None
        if ctx.needs_input_grad[0]:
            if torch.compiler.is_compiling() or torch.is_grad_enabled():
                # torch.compile cannot trace a non-contiguous out=, nor can autograd differentiate an out=
                # (create_graph=True): concatenate (Inductor plans the buffer)
                dw = torch.cat((torch.mm(dy.t(), a), torch.mm(dy.t(), b)), dim=1)
            else:
                dw = torch.empty_like(weight)
                torch.mm(dy.t(), a, out=dw[:, :ka])
                torch.mm(dy.t(), b, out=dw[:, ka:])
        dbias = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return dw, dbias, da, db_


def linear_of_concat(linear: Module, parts: Sequence[Tensor]) -> Tensor:
    """``linear(torch.cat(parts, dim=-1))``; for a :func:`plain_linear` and two parts as one matmul per
    part that accumulates into the output (no concatenated copy: FLUX's single block saves 5·D per
    token), else the module called on the concatenation."""
    parts = tuple(parts)
    if not (len(parts) == 2 and plain_linear(linear)
            and all(p.dtype == linear.weight.dtype and _plain_tensor(p) for p in parts)):
        return linear(torch.cat(parts, dim=-1))
    a, b = parts
    lead = a.shape[:-1]
    out = _LinearOfTwo.apply(linear.weight, linear.bias, a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))
    return out.view(*lead, linear.out_features)


_MAX_LINEARS_OF_ONE_INPUT = 4


def _gelu_tanh_bias_backward(dy: Tensor, pre: Tensor, bias: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """(dpre, Σ dpre or None) inside a backward: :func:`ditfast.ops.gelu_tanh_backward` (one pass), or
    aten's ops where the backward must itself be differentiable (create_graph=True) or the dtype is one
    the kernels do not take (float64)."""
    if torch.is_grad_enabled() or pre.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        dpre = torch.ops.aten.gelu_backward(dy, pre, approximate="tanh")
        return dpre, (dpre.sum(0) if bias else None)
    return ops.gelu_tanh_backward(dy, pre, bias_grad=bias)


class _LinearsOfOneInput(torch.autograd.Function):
    """``h @ W_iᵀ + b_i`` for one to four Linears of one 2-D input ``h`` (T, K); (weight, bias) slots past
    the last Linear are None; with ``gelu_last``, the last output is ``gelu(·, approximate="tanh")`` of
    its matmul (the MLP's first Linear), whose pre-activation is saved. Backward: the input's gradient
    ``Σ_i dY_i · W_i`` accumulated by the matmuls (beta = 1) into one (T, K) tensor, not one tensor per
    Linear summed by autograd's adds; each weight gradient ``dY_iᵀ · h``, each bias gradient
    ``Σ_T dY_i``; for a GELU output, its pre-activation gradient and bias gradient in one pass
    (:func:`ditfast.ops.gelu_tanh_backward`; no read-back of the (T, N) gradient for the sum).

    The arity of ``forward`` is fixed (see :class:`_LinearOfTwo`)."""

    @staticmethod
    def forward(ctx, h, w0, b0, w1, b1, w2, b2, w3, b3, gelu_last):
        ws = [w for w in (w0, w1, w2, w3) if w is not None]
        bs = (b0, b1, b2, b3)[:len(ws)]
        ctx.has_bias = tuple(b is not None for b in bs)
        ctx.gelu_last = gelu_last
        outs = [torch.mm(h, w.t()) if b is None else torch.addmm(b, h, w.t()) for w, b in zip(ws, bs)]
        pre = ()
        if gelu_last:
            pre = (outs[-1], bs[-1])
            outs[-1] = nn.functional.gelu(outs[-1], approximate="tanh")
        ctx.save_for_backward(h, *pre, *ws)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        h, *rest = ctx.saved_tensors
        (pre, bias_last), ws = (rest[:2], rest[2:]) if ctx.gelu_last else ((None, None), rest)
        if ctx.gelu_last and torch.is_grad_enabled():  # create_graph=True: pre as a function of h, W, b
            pre = nn.functional.linear(h, ws[-1], bias_last)
        need = ctx.needs_input_grad
        n = len(dys)
        dys = list(dys)
        dbias_last = None
        if ctx.gelu_last:
            dys[-1], dbias_last = _gelu_tanh_bias_backward(dys[-1], pre, ctx.has_bias[-1] and need[2 * n])
        dh = None
        if need[0]:
            dh = torch.mm(dys[0], ws[0])
            for dy, w in zip(dys[1:], ws[1:]):
                # torch.compile traces the out-of-place form (Inductor plans the buffers)
                dh = torch.addmm(dh, dy, w) if torch.compiler.is_compiling() else dh.addmm_(dy, w)
        grads = [dh]
        for i, dy in enumerate(dys):
            grads.append(torch.mm(dy.t(), h) if need[1 + 2 * i] else None)
            if ctx.gelu_last and i == n - 1:
                grads.append(dbias_last)
            else:
                grads.append(dy.sum(0) if ctx.has_bias[i] and need[2 + 2 * i] else None)
        return tuple(grads) + (None,) * (2 * (_MAX_LINEARS_OF_ONE_INPUT - n)) + (None,)


def linears_of_one_input(linears: Sequence[Module], h: Tensor, *, gelu_tanh_last: bool = False) -> Tuple[Tensor, ...]:
    """``tuple(linear(h) for linear in linears)``, the last one through ``gelu(·, approximate="tanh")``
    when ``gelu_tanh_last``. When ``h``'s gradient is needed and the Linears (2 to 4; 1 to 4 with
    ``gelu_tanh_last``) are all :func:`plain_linear` of ``h``'s dtype (the separate q / k / v
    projections, with FLUX's ``proj_mlp`` in its single block; a FeedForward's first Linear), as one
    autograd function whose backward accumulates the input gradient in the matmuls (no (T, K) add per
    extra Linear) and fuses the GELU backward with the bias gradient; else each module is called."""
    linears = tuple(linears)
    fused = (
        (1 if gelu_tanh_last else 2) <= len(linears) <= _MAX_LINEARS_OF_ONE_INPUT
        and torch.is_grad_enabled() and h.requires_grad and _plain_tensor(h)
        and all(plain_linear(m) and m.weight.dtype == h.dtype
                and (m.bias is None or m.bias.dtype == h.dtype) for m in linears)
    )
    if not fused:
        outs = [m(h) for m in linears]
        if gelu_tanh_last:
            outs[-1] = nn.functional.gelu(outs[-1], approximate="tanh")
        return tuple(outs)
    slots = []
    for m in linears:
        slots += [m.weight, m.bias]
    slots += [None] * (2 * (_MAX_LINEARS_OF_ONE_INPUT - len(linears)))
    outs = _LinearsOfOneInput.apply(h.reshape(-1, h.shape[-1]), *slots, gelu_tanh_last)
    lead = h.shape[:-1]
    return tuple(o.view(*lead, m.out_features) for o, m in zip(outs, linears))


class _LinearGeluTail(torch.autograd.Function):
    """``out = h @ Wᵀ + b`` (T, N) in one matmul, returned as ``(out[:, :width], gelu(out[:, width:]))``
    (tanh form): FLUX's packed ``linear1`` = ``[q | k | v | MLP]``. Backward: the GELU backward and the
    tail's bias gradient in one pass (:func:`ditfast.ops.gelu_tanh_backward`); the weight gradient's row
    blocks written straight into one (N, K) tensor and the input gradient accumulated by the matmuls,
    with no (T, N) concatenation of the two output gradients."""

    @staticmethod
    def forward(ctx, h, weight, bias, width):
        out = torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())
        head, pre = out[:, :width], out[:, width:]
        ctx.width, ctx.has_bias = width, bias is not None
        ctx.save_for_backward(h, weight, bias, pre)
        return head, nn.functional.gelu(pre, approximate="tanh")

    @staticmethod
    def backward(ctx, dhead, dact):
        h, weight, bias, pre = ctx.saved_tensors
        width, need = ctx.width, ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: the pre-activation as a function of h, W, b
            pre = nn.functional.linear(h, weight[width:], None if bias is None else bias[width:])
        want_bias = ctx.has_bias and need[2]
        dpre, dtail = _gelu_tanh_bias_backward(dact, pre, want_bias)
        dh = dw = dbias = None
        if need[0]:
            dh = torch.mm(dhead, weight[:width])
            dh = torch.addmm(dh, dpre, weight[width:]) if torch.compiler.is_compiling() else dh.addmm_(dpre, weight[width:])
        if need[1]:
            if torch.compiler.is_compiling() or torch.is_grad_enabled():  # out= is neither traced nor differentiable
                dw = torch.cat((torch.mm(dhead.t(), h), torch.mm(dpre.t(), h)))
            else:
                dw = torch.empty_like(weight)
                torch.mm(dhead.t(), h, out=dw[:width])  # row blocks of a contiguous tensor: contiguous
                torch.mm(dpre.t(), h, out=dw[width:])
        if want_bias:
            dbias = torch.cat((dhead.sum(0), dtail))
        return dh, dw, dbias, None


class _LinearSplit(torch.autograd.Function):
    """``out = h @ Wᵀ + b`` returned as its two column blocks ``(out[:, :width], out[:, width:])``, computed
    as two matmuls over the row blocks of W (the same FLOPs as one). Backward: the input gradient
    accumulated by the matmuls, the weight gradient's row blocks written straight into one (N, K)
    tensor, the bias gradient's halves concatenated (N elements): none of the (T, N) zero-filled
    slice-backward copies and adds that autograd spends on two slices of one output."""

    @staticmethod
    def forward(ctx, h, weight, bias, width):
        wh, wt = weight[:width], weight[width:]
        if bias is None:
            head, tail = torch.mm(h, wh.t()), torch.mm(h, wt.t())
        else:
            head, tail = torch.addmm(bias[:width], h, wh.t()), torch.addmm(bias[width:], h, wt.t())
        ctx.width, ctx.has_bias = width, bias is not None
        ctx.save_for_backward(h, weight)
        return head, tail

    @staticmethod
    def backward(ctx, dhead, dtail):
        h, weight = ctx.saved_tensors
        width, need = ctx.width, ctx.needs_input_grad
        dh = dw = dbias = None
        if need[0]:
            dh = torch.mm(dhead, weight[:width])
            dh = torch.addmm(dh, dtail, weight[width:]) if torch.compiler.is_compiling() or torch.is_grad_enabled() \
                else dh.addmm_(dtail, weight[width:])
        if need[1]:
            if torch.compiler.is_compiling() or torch.is_grad_enabled():  # out= is neither traced nor differentiable
                dw = torch.cat((torch.mm(dhead.t(), h), torch.mm(dtail.t(), h)))
            else:
                dw = torch.empty_like(weight)
                torch.mm(dhead.t(), h, out=dw[:width])
                torch.mm(dtail.t(), h, out=dw[width:])
        if ctx.has_bias and need[2]:
            dbias = torch.cat((dhead.sum(0), dtail.sum(0)))
        return dh, dw, dbias, None


def linear_split(linear: Module, h: Tensor, width: int) -> Tuple[Tensor, Tensor]:
    """``(out[..., :width], out[..., width:])`` of ``out = linear(h)``. In training, for a
    :func:`plain_linear` of ``h``'s dtype, as :class:`_LinearSplit` (no slice-backward copies); otherwise
    the module and two slices."""
    fused = (
        torch.is_grad_enabled() and plain_linear(linear) and _plain_tensor(h)
        and (h.requires_grad or linear.weight.requires_grad)
        and h.dtype == linear.weight.dtype and (linear.bias is None or linear.bias.dtype == h.dtype)
    )
    if not fused:
        out = linear(h)
        return out[..., :width], out[..., width:]
    head, tail = _LinearSplit.apply(h.reshape(-1, h.shape[-1]), linear.weight, linear.bias, width)
    lead = h.shape[:-1]
    return head.view(*lead, width), tail.view(*lead, tail.shape[-1])


def linear_gelu_tail(linear: Module, h: Tensor, width: int) -> Tuple[Tensor, Tensor]:
    """``(out[..., :width], gelu(out[..., width:], approximate="tanh"))`` of ``out = linear(h)``. In
    training, for a :func:`plain_linear` of ``h``'s dtype, as :class:`_LinearGeluTail` (the GELU
    backward fused with the bias gradient); otherwise the module, a split and the GELU."""
    fused = (
        torch.is_grad_enabled() and plain_linear(linear) and _plain_tensor(h)
        and (h.requires_grad or linear.weight.requires_grad)
        and h.dtype == linear.weight.dtype and (linear.bias is None or linear.bias.dtype == h.dtype)
    )
    if not fused:
        out = linear(h)
        return out[..., :width], nn.functional.gelu(out[..., width:], approximate="tanh")
    head, act = _LinearGeluTail.apply(h.reshape(-1, h.shape[-1]), linear.weight, linear.bias, width)
    lead = h.shape[:-1]
    return head.view(*lead, width), act.view(*lead, act.shape[-1])


# device types where torch._addmm_activation(..., use_gelu=True) applies the tanh approximation of
# GELU: on CUDA (cuBLASLt's GELU epilogue, or gelu(approximate="tanh") after the matmul where
# cuBLASLt is not used); on CPU it applies the exact erf GELU, which is not FLUX's, so CPU tensors
# take the unfused path. (The ledger, ditfast/bench/ledger.py, adds "cpu" while it counts fake CPU
# tensors that stand for CUDA ones; no data is computed then.)
GELU_TANH_EPILOGUE_DEVICES = {"cuda"}


def linear_gelu_tanh(linear: Module, h: Tensor) -> Tensor:
    """``gelu(linear(h), approximate="tanh")``. In inference (no gradient needed), for a
    :func:`plain_linear` with a bias on CUDA, the GELU runs in the matmul's epilogue
    (``torch._addmm_activation``, which has no backward): the (T, N) pre-activation is never written
    and read back. In training, :func:`linears_of_one_input` (for a plain Linear: the GELU backward and
    the bias gradient in one pass); otherwise the module, then the GELU."""
    w, b = getattr(linear, "weight", None), getattr(linear, "bias", None)
    fused = (
        b is not None
        and h.device.type in GELU_TANH_EPILOGUE_DEVICES
        and plain_linear(linear)
        and h.dtype == w.dtype == b.dtype
        and not (torch.is_grad_enabled() and (h.requires_grad or w.requires_grad or b.requires_grad))
    )
    if not fused:  # training: linears_of_one_input fuses the GELU backward with the bias gradient
        return linears_of_one_input((linear,), h, gelu_tanh_last=True)[0]
    out = torch._addmm_activation(b, h.reshape(-1, h.shape[-1]), w.t(), use_gelu=True)
    return out.view(*h.shape[:-1], linear.out_features)


# ------------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------------
def dit_block(x: Tensor, mod: Sequence[Tensor], s: Stream, *, head_dim: int, qk_eps: float = 1e-6,
              attention: Attention = None) -> Tensor:
    """DiT block (adaLN-Zero, self-attention, MLP): x (B, L, D) -> (B, L, D).

    mod: (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp).
    """
    shift1, scale1, gate1, shift2, scale2, gate2 = mod
    (o,) = _attend_streams((s,), (qkv_heads(s.qkv, ops.norm_modulate(x, shift1, scale1, eps=s.eps), head_dim),),
                           None, qk_eps)
    x, h = ops.gated_residual_norm_modulate(x, s.proj(o), gate1, shift2, scale2, eps=s.eps2)
    return ops.gated_residual(x, s.mlp(h), gate2)


def flux_double(img: Tensor, txt: Tensor, img_mod: Sequence[Tensor], txt_mod: Sequence[Tensor], rope: Rope,
                img_s: Stream, txt_s: Stream, *, head_dim: int, qk_eps: float = 1e-6,
                attention: Attention = None, attn_call: Optional[Callable] = None, image_first: bool = False,
                key_lengths=None) -> Tuple[Tensor, Tensor]:
    """FLUX double-stream block: img (B, Li, D), txt (B, Lt, D) -> (img, txt).

    *_mod: (shift1, scale1, gate1, shift2, scale2, gate2) per stream. rope: (cos, sin) of the joint
    sequence [txt, img] or None. attn_call: None, or a callable taking the modulated (img, txt)
    and returning their projected attention outputs (img, txt), which then replaces the streams'
    qkv / QK-norm / attention / proj (the diffusers integration calls the attention module
    through it when hooks sit on that module). image_first: the joint sequence is [img, txt]
    (HunyuanVideo) and rope covers it in that order. key_lengths: per sample, the valid (prefix) keys of
    the joint sequence (HunyuanVideo's text padding follows the video tokens).
    """
    t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = txt_mod
    i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = img_mod
    h_txt = ops.norm_modulate(txt, t_shift1, t_scale1, eps=txt_s.eps)
    h_img = ops.norm_modulate(img, i_shift1, i_scale1, eps=img_s.eps)
    if attn_call is not None:
        i_a, t_a = attn_call(h_img, h_txt)
    else:
        t_qkv, i_qkv = qkv_heads(txt_s.qkv, h_txt, head_dim), qkv_heads(img_s.qkv, h_img, head_dim)
        if image_first:
            i_o, t_o = _attend_streams((img_s, txt_s), (i_qkv, t_qkv), rope, qk_eps, attention, key_lengths)
        else:  # text first, as FLUX
            t_o, i_o = _attend_streams((txt_s, img_s), (t_qkv, i_qkv), rope, qk_eps, attention, key_lengths)
        i_a, t_a = img_s.proj(i_o), txt_s.proj(t_o)

    img, h = ops.gated_residual_norm_modulate(img, i_a, i_gate1, i_shift2, i_scale2, eps=img_s.eps2)
    img = ops.gated_residual(img, img_s.mlp(h), i_gate2)
    txt, h = ops.gated_residual_norm_modulate(txt, t_a, t_gate1, t_shift2, t_scale2, eps=txt_s.eps2)
    txt = ops.gated_residual(txt, txt_s.mlp(h), t_gate2)
    return img, txt


def flux_single(x: Tensor, mod: Sequence[Tensor], rope: Rope, s: Stream, *, head_dim: int,
                qk_eps: float = 1e-6, attention: Attention = None, attn_call: Optional[Callable] = None,
                gelu_linear: Optional[Module] = None, packed_act: Optional[Module] = None,
                key_lengths=None) -> Tensor:
    """FLUX single-stream block (attention and MLP in parallel): x [txt, img] (B, L, D) -> (B, L, D).

    mod: (shift, scale, gate). ``s.proj`` is the output Linear over ``[attention | MLP hidden]``
    (FLUX's ``linear2``), run by :func:`linear_of_concat` (no concatenated copy for a plain Linear). ``s.mlp`` maps the modulated input to the MLP hidden activation
    (GELU(tanh) of ``proj_mlp``), or is None when ``s.qkv`` is FLUX's ``linear1``, whose output
    ``[q | k | v | mlp]`` is split here (one matmul) and the GELU(tanh) applied here. attn_call: None,
    or a callable mapping the modulated input to the (unprojected) attention output, replacing the
    qkv / QK-norm / attention steps (needs ``s.mlp``; see :func:`flux_double`). gelu_linear: None, or the
    Linear of ``s.mlp`` when ``s.mlp(h)`` is ``gelu(gelu_linear(h), approximate="tanh")`` (diffusers'
    ``proj_mlp``); with separate q / k / v Linears, all four then run as :func:`linears_of_one_input`
    where it applies (training: one input gradient, no adds), and in inference as before (``s.mlp``).
    packed_act: with a packed ``s.qkv``, the activation of its MLP columns in place of GELU(tanh) (FLUX.2's
    SwiGLU over ``[gate | up]``: ``[q | k | v | gate | up]`` is one matmul's output). key_lengths: per
    sample, the valid (prefix) keys of x.
    """
    shift, scale, gate = mod
    h = ops.norm_modulate(x, shift, scale, eps=s.eps)
    if attn_call is not None:
        return ops.gated_residual(x, linear_of_concat(s.proj, (attn_call(h), s.mlp(h))), gate)
    if s.mlp is None and packed_act is not None:
        qkv, pre = linear_split(s.qkv, h, 3 * x.shape[-1])
        q, k, v = qkv.unflatten(-1, (3, -1, head_dim)).unbind(-3)
        mlp = packed_act(pre)
    elif s.mlp is None:
        qkv, mlp = linear_gelu_tail(s.qkv, h, 3 * x.shape[-1])
        q, k, v = qkv.unflatten(-1, (3, -1, head_dim)).unbind(-3)
    elif gelu_linear is not None and isinstance(s.qkv, tuple) and torch.is_grad_enabled() and h.requires_grad:
        # training: q, k, v and the MLP's Linear with one backward (inference keeps s.mlp's GELU epilogue)
        *qkv, mlp = linears_of_one_input((*s.qkv, gelu_linear), h, gelu_tanh_last=True)
        q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in qkv)
    else:
        mlp = s.mlp(h)
        q, k, v = qkv_heads(s.qkv, h, head_dim)
    (o,) = _attend_streams((s,), ((q, k, v),), rope, qk_eps, attention, key_lengths)
    return ops.gated_residual(x, linear_of_concat(s.proj, (o, mlp)), gate)


def sd3_joint(context: Tensor, x: Tensor, c_mod: Sequence[Tensor], x_mod: Sequence[Tensor], cs: Stream,
              xs: Stream, *, head_dim: int, x2: Optional[Stream] = None,
              qk_eps: float = 1e-6, attention: Attention = None) -> Tuple[Optional[Tensor], Tensor]:
    """SD3 / SD3.5 MM-DiT joint block: context (B, Lc, D), x (B, Lx, D) -> (context, x).

    c_mod: (shift, scale, gate, shift_mlp, scale_mlp, gate_mlp), or (shift, scale) for a pre-only
    context (``cs.proj`` and ``cs.mlp`` None; context None on return). x_mod: the same six, plus
    (shift2, scale2, gate2) with SD3.5-medium's dual attention, whose image-only self-attention is
    ``x2`` (its qkv, proj and QK-norm). The joint attention runs over [context, x].
    """
    pre_only = len(c_mod) == 2
    if (x2 is not None) != (len(x_mod) == 9):
        raise ValueError(f"x_mod has {len(x_mod)} chunks: 9 with dual attention (x2 given), else 6")
    hc = ops.norm_modulate(context, c_mod[0], c_mod[1], eps=cs.eps)
    if x2 is not None:
        h, h2 = ops.norm_modulate_dual(x, x_mod[0], x_mod[1], x_mod[6], x_mod[7], eps=xs.eps)
    else:
        h = ops.norm_modulate(x, x_mod[0], x_mod[1], eps=xs.eps)
    c_qkv, x_qkv = qkv_heads(cs.qkv, hc, head_dim), qkv_heads(xs.qkv, h, head_dim)
    c_o, x_o = _attend_streams((cs, xs), (c_qkv, x_qkv), None, qk_eps, attention)

    # image stream: attention residual (then attn2's), modulate for the MLP, MLP
    a, gate = xs.proj(x_o), x_mod[2]
    if x2 is not None:
        x = ops.gated_residual(x, a, gate)
        (o2,) = _attend_streams((x2,), (qkv_heads(x2.qkv, h2, head_dim),), None, qk_eps, attention)
        a, gate = x2.proj(o2), x_mod[8]
    x, h = ops.gated_residual_norm_modulate(x, a, gate, x_mod[3], x_mod[4], eps=xs.eps2)
    x = ops.gated_residual(x, xs.mlp(h), x_mod[5])
    if pre_only:
        return None, x

    context, hc = ops.gated_residual_norm_modulate(context, cs.proj(c_o), c_mod[2], c_mod[3], c_mod[4], eps=cs.eps2)
    context = ops.gated_residual(context, cs.mlp(hc), c_mod[5])
    return context, x


def sandwich_block(x: Tensor, mod: Optional[Sequence[Tensor]], s: Stream, norm_weights: Sequence[Tensor], *,
                   head_dim: int, eps: float = 1e-5, qk_eps: float = 1e-5, rope: Rope = None,
                   attention: Attention = None, key_lengths=None) -> Tensor:
    """Single-stream block with RMSNorm "sandwiches" and tanh gates (Z-Image; Lumina 2's layout):
    x (B, L, D) -> (B, L, D)::

        x = x + tanh(g_attn) · RMS(attn(RMS(x)·w0 · (1 + s_attn)))·w1
        x = x + tanh(g_mlp)  · RMS(mlp(RMS(x)·w2 · (1 + s_mlp)))·w3

    mod: (s_attn, g_attn, s_mlp, g_mlp), the raw adaLN chunks (B, D) or (B, L, D) (tanh and 1 + are
    applied here), or None for an unmodulated block (Z-Image's refiners: x + RMS(attn(RMS(x)·w0))·w1,
    run as scale 0 and an identity gate of 1, exact). norm_weights: (w0, w1, w2, w3), the four RMSNorm
    weights (D,); eps their eps. s: the stream's q/k/v projections (packed or a triple), output
    projection, MLP and per-head QK-norm weights; qk_eps their eps. rope: fp32 (cos, sin) tables
    (L, Dh/2) or per sample (B, L, Dh/2), interleaved pairs. Three fused ops: the pre-norm modulate,
    the attention's post-norm gated residual fused with the MLP's pre-norm modulate, and the MLP's
    post-norm gated residual. key_lengths: per sample, its valid (prefix) tokens as keys (Z-Image's padded
    batches; the padded rows are computed as diffusers does, attending the valid keys).
    """
    w0, w1, w2, w3 = norm_weights
    if mod is None:
        zero = x.new_zeros((1, x.shape[-1]))
        s_attn = s_mlp = zero
        g_attn = g_mlp = x.new_ones((1, x.shape[-1]))
        act = None
    else:
        s_attn, g_attn, s_mlp, g_mlp = mod
        act = "tanh"
    h = ops.norm_modulate(x, None, s_attn, eps=eps, norm="rms", weight=w0)
    (o,) = _attend_streams((s,), (qkv_heads(s.qkv, h, head_dim),), rope, qk_eps, attention, key_lengths)
    x, h = ops.gated_residual_norm_modulate(x, s.proj(o), g_attn, None, s_mlp, eps=eps, norm="rms", weight=w2,
                                            gate_act=act, y_weight=w1, y_eps=eps)
    return ops.gated_residual(x, s.mlp(h), g_mlp, gate_act=act, y_weight=w3, y_eps=eps)


def parallel_block(xs: Sequence[Tensor], mods: Sequence[Sequence[Tensor]], s: Stream, *, head_dim: int,
                   qk_eps: float = 1e-6, rope: Rope = None, attention: Attention = None) -> Tuple[Tensor, ...]:
    """Parallel-residual block over one or more token streams that share every weight (FLUX.3's per-mode
    blocks: one stream; its joint single blocks: [text, content]); per stream i::

        h_i = LN(x_i) · (1 + scale_i) + shift_i
        o   = attention over the joint sequence [h_0; h_1; ...]   (q/k/v, per-head QK-RMSNorm, RoPE)
        x_i + gate_i · (proj(o_i) + mlp(h_i))

    xs: (B, L_i, D) per stream. mods: per stream (shift, scale, gate), each (B, D) or per token
    (B, L_i, D). s: the shared projections (a packed Linear or a q/k/v triple), output projection, MLP,
    per-head QK-norm weights and the LayerNorm eps. rope: fp32 (cos, sin) of the joint sequence.
    Returns the streams' new residuals.
    """
    hs = [ops.norm_modulate(x, shift, scale, eps=s.eps) for x, (shift, scale, _) in zip(xs, mods)]
    outs = _attend_streams([s] * len(xs), [qkv_heads(s.qkv, h, head_dim) for h in hs], rope, qk_eps, attention)
    return tuple(ops.gated_residual(x, s.proj(o) + s.mlp(h), gate) for x, h, o, (_, _, gate) in zip(xs, hs, outs, mods))


class CrossKV(NamedTuple):
    """Keys and values of one cross-attention context: ``kv`` a (to_k, to_v) pair or one packed Linear
    ``[k | v]``, applied to ``context`` (B, L_k, C); ``k_norm`` the across-heads RMSNorm weight (H·Dh,) of
    the keys or None."""

    context: Tensor
    kv: Union[Module, Tuple[Module, Module]]
    k_norm: Optional[Tensor] = None
    key_lengths: Optional[Sequence[int]] = None  # per sample, its valid (prefix) context tokens; None: all


def _across_heads(t: Tensor, weight: Optional[Tensor], eps: float, head_dim: int) -> Tensor:
    """(B, L, H·Dh) -> its RMSNorm over all heads (one rstd per token; Wan's QK-norm), as (B, L, H, Dh)."""
    if weight is not None:
        t = ops.rms_norm(t, weight, eps=eps)
    return t.unflatten(-1, (-1, head_dim))


def _self_attention_across_heads(q: Tensor, k: Tensor, v: Tensor, q_norm: Optional[Tensor], k_norm: Optional[Tensor],
                                 rope: Rope, eps: float, head_dim: int, attention: Attention) -> Tensor:
    """Self-attention of (B, L, H·Dh) q, k, v with Wan's QK-norm (an RMSNorm over all heads of a token) and
    RoPE -> (B, L, H·Dh). One stream needs no joint buffer: ``qk_norm_rope(across_heads=True)`` normalizes
    and rotates q and k in one pass each and v is attended in place (a view of its projection). DTensors
    take the norm and ``attend``'s prepare pass instead (a head shard holds part of a token's norm)."""
    q4, k4, v4 = (t.unflatten(-1, (-1, head_dim)) for t in (q, k, v))
    if q_norm is not None and k_norm is not None and rope is not None and _plain_tensor(q) and _plain_tensor(k):
        q4, k4 = ops.qk_norm_rope(q4, k4, q_norm, k_norm, rope[0], rope[1], eps=eps, across_heads=True)
        o = ops.joint_attention(q4, k4, v4) if attention is None else attention(q4, k4, v4)
        return o.flatten(2)
    q, k = _across_heads(q, q_norm, eps, head_dim), _across_heads(k, k_norm, eps, head_dim)
    (o,) = attend((q,), (k,), (v4,), rope=rope, attention=attention)
    return o


def _kv(c: CrossKV, eps: float, head_dim: int) -> Tuple[Tensor, Tensor]:
    k, v = (c.kv[0](c.context), c.kv[1](c.context)) if isinstance(c.kv, tuple) else c.kv(c.context).chunk(2, dim=-1)
    return _across_heads(k, c.k_norm, eps, head_dim), v.unflatten(-1, (-1, head_dim))


def cross_block(x: Tensor, mod: Sequence[Tensor], s: Stream, cross_q: Module, cross_q_norm: Optional[Tensor],
                contexts: Sequence[CrossKV], cross_proj: Module, *, head_dim: int, eps: float = 1e-6,
                qk_eps: float = 1e-6, rope: Rope = None, norm2: Optional[Tuple[Tensor, Tensor]] = None,
                attention: Attention = None) -> Tensor:
    """Self-attention, cross-attention and MLP with adaLN-single modulation (Wan 2.x; the DiT paper's
    cross-attention conditioning): x (B, L, D) -> (B, L, D), every step's result in x's dtype::

        h = LN(x)·(1 + scale) + shift                       x = x + gate · proj(attn(h))
        h = LN_affine(x) (norm2; x itself when None)        x = x + cross_proj(Σ_c attn(q(h), k_c, v_c))
        h = LN(x)·(1 + c_scale) + c_shift                   x = x + c_gate · mlp(h)

    mod: (shift, scale, gate, c_shift, c_scale, c_gate), (B, D) or per token (B, L, D), any dtype (Wan's
    are fp32: the math is fp32 and each result is rounded once to x's dtype). s: the self-attention's
    projections (a q/k/v triple or a packed Linear), output projection, MLP, and its across-heads
    RMSNorm weights (H·Dh,) as q_norm / k_norm (eps ``qk_eps``); rope: the self-attention's fp32 (cos,
    sin) tables (interleaved pairs). cross_q, cross_q_norm: the cross-attention's query projection and
    across-heads norm weight; contexts: one :class:`CrossKV` per context attended (Wan's text; I2V adds
    the image tokens: the outputs are summed); cross_proj: its output projection. norm2: the
    (weight, bias) of the affine LayerNorm before the cross-attention, or None. attention: what
    attends the self-attention (context parallelism); the cross-attention runs ``ops.joint_attention``.
    """
    # x's dtype for every result (Wan's fp32 modulation); None where the promotion is x's dtype anyway
    # (then the ops' plain paths, the compiled extension included, can run)
    dt = x.dtype if any(m.dtype != x.dtype for m in mod) else None
    shift, scale, gate, c_shift, c_scale, c_gate = mod
    h = ops.norm_modulate(x, shift, scale, eps=s.eps, out_dtype=dt)
    if isinstance(s.qkv, tuple):
        q, k, v = linears_of_one_input(s.qkv, h)
    else:
        q, k, v = s.qkv(h).chunk(3, dim=-1)
    o = _self_attention_across_heads(q, k, v, s.q_norm, s.k_norm, rope, qk_eps, head_dim, attention)
    x = ops.gated_residual(x, s.proj(o), gate, out_dtype=dt)

    if norm2 is None:
        h = x
    else:
        w, b = norm2
        h = ops.norm_modulate(x, b.unsqueeze(0), b.new_zeros((1, b.shape[0])), eps=s.eps, weight=w, out_dtype=dt)
    q = _across_heads(cross_q(h), cross_q_norm, qk_eps, head_dim)
    o = None
    for c in contexts:
        k, v = _kv(c, qk_eps, head_dim)
        part = ops.joint_attention(q, k, v, key_lengths=c.key_lengths).flatten(2)
        o = part if o is None else o + part
    ones = x.new_ones((1, x.shape[-1]))  # the cross-attention's residual has no gate: x + 1·y, exact
    x, h = ops.gated_residual_norm_modulate(x, cross_proj(o), ones, c_shift, c_scale, eps=s.eps2, out_dtype=dt)
    return ops.gated_residual(x, s.mlp(h), c_gate, out_dtype=dt)


def final_layer(x: Tensor, shift: Optional[Tensor], scale: Tensor, linear: Module, *, eps: float = 1e-6) -> Tensor:
    """DiT's ``FinalLayer`` and FLUX's ``LastLayer`` (diffusers' ``norm_out`` + ``proj_out``):
    ``linear(LN(x) * (1 + scale) + shift)``; x (B, L, D), shift / scale (B, D)."""
    return linear(ops.norm_modulate(x, shift, scale, eps=eps))
