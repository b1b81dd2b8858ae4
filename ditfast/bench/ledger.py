"""The model-step ledger: bytes, FLOPs and calls of every op of a full-size model step, counted, not timed.

``python -m ditfast.bench ledger`` builds each diffusers transformer ditfast patches at its real size
(FLUX.1-dev and SD3.5-large at 1024², DiT-XL/2 at 256²) under
``torch._subclasses.fake_tensor.FakeTensorMode`` -- tensors with shapes, dtypes and a device but no
data, so a 12B-parameter model costs no memory and a step a few seconds of CPU -- and runs one
inference step (forward under no_grad) and one training step (forward + backward of every parameter)
three ways:

``eager``    diffusers' own forward (its SDPA calls counted as the flash-attention op a GPU runs)
``patched``  the same model after ``ditfast.patch``, ops forced to one ditfast family (default
             ``triton``, the GPU path), dispatching exactly as on a GPU (:func:`gpu_dispatch`)
``floor``    the matmuls and attention of the patched step only: what no fusion outside them removes

A ``TorchDispatchMode`` inside the fake mode sees every aten op and every ditfast custom op
(``torch.ops.ditfast.*``, whose registered fake kernels give the output shapes) after autograd, so
backward ops are seen one by one. Per op it records calls, bytes and FLOPs:

Bytes (what the op must move through memory at least once):
  * every op: the bytes of its tensor inputs read plus its tensor outputs written, each tensor
    counted once per call (a tensor passed twice is read once);
  * a tensor's bytes are the distinct elements its strides address times the element size: a
    strided view (a chunk of a packed projection, ``x[..., :D]``) counts its own elements, a
    stride-0 broadcast (``expand``) counts the elements it really addresses once;
  * views and metadata ops (``view``, ``t``, ``permute``, ``slice``, ``split``, ``unbind``,
    ``expand``, ``_unsafe_view``, ...; any op whose schema returns an alias it does not write)
    move nothing; allocations (``empty*``) write nothing;
  * an op that writes a tensor it does not read (``copy_``, ``fill_``, ``zero_``, an ``out=``
    argument) counts that tensor as written only; an in-place op (``add_``) reads and writes it;
  * a ditfast op (``ditfast::norm_modulate``, ``prepare_attention``, ``flash_attention``, their
    ``_backward``\\ s, ...) by the same rule: its kernels are one pass, each input read once, each
    output (the fp32 row statistics included) written once;
  * a gather (``aten.embedding``) reads the rows it returns and the indices, not the whole table;
  * attention (``aten._scaled_dot_product_*_attention*``, ``ditfast::flash_attention*``) counts q,
    k, v, o (and lse, dO, dq, dk, dv) once: the IO of a flash kernel, not the L x L scores.
  FLOPs: matmuls 2·M·N·K (``mm``, ``addmm``, ``addmm_``, ``bmm``, ``baddbmm``, ``_addmm_activation``;
  convolutions 2 · output elements · C_in/groups · kernel size, their backward twice that);
  attention forward 4·B·H·Lq·Lk·Dh, backward 2.5 times that (five matmuls against two). Other ops
  count no FLOPs: they are memory-bound.

Predicted time: per op call ``max(FLOPs / compute peak, bytes / bandwidth)`` (a roofline; launch
overheads ignored), summed. The peaks are those of the newest GPU results file of the device under
``benchmarks/results/<device>/`` (copy GB/s, matmul TFLOP/s, the best measured attention TFLOP/s)
when there is one, else the spec values below. Either way the times are a **prediction** from
counted bytes and FLOPs; the GPU run (docs/gpu-run.md) replaces them with measurements.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

SCHEMA = "ditfast.bench.ledger/1"

# Spec values, used when no GPU results file of the device exists. Bandwidth: what a large
# device-to-device copy reaches (about 90% of the datasheet's HBM figure: H100 SXM 3.35 TB/s, H200
# 4.8 TB/s); matmul: what cuBLAS reaches on large bf16 GEMMs (about 70% of the 989 TFLOP/s dense bf16
# datasheet figure); attention: FlashAttention-3-class kernels in bf16 at Dh 128 (the FA3 paper
# reports 600-750 TFLOP/s forward on H100). These are the assumptions of issue 24, stated here so a
# prediction says what it rests on.
SPEC_PEAKS = {
    "h100": {"bandwidth_gbps": 3000.0, "matmul_tflops": 700.0, "attention_tflops": 600.0,
             "source": "spec values (no GPU results file): H100 SXM datasheet 3.35 TB/s HBM3 and 989 TFLOP/s "
                       "dense bf16, taken at the reachable 3.0 TB/s copy and ~700 TFLOP/s cuBLAS bf16 GEMM; "
                       "~600 TFLOP/s FlashAttention-3-class bf16 attention (FA3 paper: 600-750 fwd)"},
    "h200": {"bandwidth_gbps": 4300.0, "matmul_tflops": 700.0, "attention_tflops": 600.0,
             "source": "spec values (no GPU results file): H200 datasheet 4.8 TB/s HBM3e, taken at ~90% = 4.3 TB/s; "
                       "compute as the H100 (same GH100 die): ~700 TFLOP/s bf16 GEMM, ~600 TFLOP/s attention"},
}
PREDICTION_NOTE = ("PREDICTION: times are counted bytes and FLOPs over peak rates (roofline per op call, no launch "
                   "overheads), not measurements; the GPU run (docs/gpu-run.md) replaces them with measured times")

MATMUL_OPS = frozenset({"aten.mm", "aten.addmm", "aten.addmm_", "aten.bmm", "aten.baddbmm", "aten._addmm_activation",
                        "aten.convolution", "aten.convolution_backward"})
ATTENTION_OPS = frozenset({
    "aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_flash_attention_backward",
    "aten._scaled_dot_product_efficient_attention", "aten._scaled_dot_product_efficient_attention_backward",
    "aten._scaled_dot_product_cudnn_attention", "aten._scaled_dot_product_cudnn_attention_backward",
    "aten._scaled_dot_product_flash_attention_for_cpu", "aten._scaled_dot_product_flash_attention_for_cpu_backward",
    "ditfast.flash_attention", "ditfast.flash_attention_backward"})
# ops that return a new tensor object over the same memory (no alias annotation in their schema)
_FREE_OPS = frozenset({"aten._unsafe_view", "aten.alias", "aten.lift_fresh", "aten.detach", "prim.device",
                       "aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty",
                       "aten.new_empty_strided", "aten.sym_size", "aten.sym_stride", "aten.sym_numel",
                       "aten.sym_storage_offset", "aten.is_same_size", "aten._local_scalar_dense"})
# ops that overwrite their first argument without reading it
_WRITE_ONLY_SELF = frozenset({"aten.copy_", "aten.fill_", "aten.zero_", "aten.normal_", "aten.uniform_",
                              "aten.bernoulli_", "aten.random_"})
# factories that take their first argument for its dtype / device / shape only (they read none of its data)
_LIKE_FACTORIES = frozenset({"aten.new_zeros", "aten.new_ones", "aten.new_full", "aten.zeros_like", "aten.ones_like",
                             "aten.full_like"})


def op_name(func) -> str:
    """'aten.mm' / 'ditfast.norm_modulate' (the overload dropped: one row per op)."""
    packet = getattr(func, "_overloadpacket", None)
    return str(packet) if packet is not None else str(func).rsplit(".", 1)[0]


def category(name: str) -> str:
    return "matmul" if name in MATMUL_OPS else "attention" if name in ATTENTION_OPS else "other"


def tensor_bytes(t: torch.Tensor) -> int:
    """Distinct elements addressed by ``t``'s sizes and strides, times its element size."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(obj) -> List[torch.Tensor]:
    leaves, _ = tree_flatten(obj)
    out, seen = [], set()
    for x in leaves:
        if isinstance(x, torch.Tensor) and id(x) not in seen:
            seen.add(id(x))
            out.append(x)
    return out


def _mm_flops(name: str, args, out) -> float:
    if name == "aten.mm":
        (m, k), n = args[0].shape, args[1].shape[1]
        return 2.0 * m * n * k
    if name in ("aten.addmm", "aten.addmm_", "aten._addmm_activation"):
        (m, k), n = args[1].shape, args[2].shape[1]
        return 2.0 * m * n * k
    if name == "aten.bmm":
        (b, m, k), n = args[0].shape, args[1].shape[2]
        return 2.0 * b * m * n * k
    if name == "aten.baddbmm":
        (b, m, k), n = args[1].shape, args[2].shape[2]
        return 2.0 * b * m * n * k
    if name == "aten.convolution":
        w, groups = args[1], args[8]
        return 2.0 * out.numel() * (w.shape[1] * math.prod(w.shape[2:]))  # w: (C_out, C_in/groups, *k)
    if name == "aten.convolution_backward":
        grad_out, w = args[0], args[2]
        return 2.0 * 2.0 * grad_out.numel() * (w.shape[1] * math.prod(w.shape[2:]))
    return 0.0


def _attention_flops(name: str, args) -> float:
    """4·B·H·Lq·Lk·Dh forward (QKᵀ and PV), 2.5 times that backward."""
    if name.startswith("ditfast."):  # q, k: (B, L, H, Dh)
        q, k = (args[1], args[2]) if name.endswith("_backward") else (args[0], args[1])
        B, Lq, H, Dh = q.shape
        Lk = k.shape[1]
    else:  # aten SDPA kernels: q, k (B, H, L, Dh); the backward takes grad_out first
        q, k = (args[1], args[2]) if name.endswith("_backward") else (args[0], args[1])
        B, H, Lq, Dh = q.shape
        Lk = k.shape[2]
    fwd = 4.0 * B * H * Lq * Lk * Dh
    return 2.5 * fwd if name.endswith("_backward") else fwd


def _written_only(func, name: str, args, kwargs) -> set:
    """ids of the arguments the op does not read (copy_'s self, out= tensors, new_ones' template)."""
    ids = set()
    if name in _WRITE_ONLY_SELF | _LIKE_FACTORIES and args and isinstance(args[0], torch.Tensor):
        ids.add(id(args[0]))
    for a in func._schema.arguments:
        if a.is_out and a.name in (kwargs or {}):
            ids.update(id(t) for t in _tensors(kwargs[a.name]))
    return ids


def is_view(func) -> bool:
    """The op returns an alias of an input and writes nothing (view / metadata ops)."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return False
    if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
        return False
    rets = schema.returns
    return bool(rets) and all(r.alias_info is not None for r in rets)


@dataclass
class OpRow:
    calls: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    flops: float = 0.0
    time_s: float = 0.0  # predicted, filled by predict()

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


@dataclass
class Ledger:
    """Per op name: calls, bytes, FLOPs; plus the per-call records the prediction needs."""

    rows: Dict[str, OpRow] = field(default_factory=lambda: defaultdict(OpRow))
    calls: List[Tuple[str, int, float]] = field(default_factory=list)  # (op, bytes, flops) per call

    def add(self, name: str, read: int, written: int, flops: float) -> None:
        r = self.rows[name]
        r.calls += 1
        r.bytes_read += read
        r.bytes_written += written
        r.flops += flops
        self.calls.append((name, read + written, flops))

    def total(self, cat: Optional[str] = None, *, exclude: Sequence[str] = ()) -> Tuple[int, float, int]:
        """(bytes, FLOPs, calls) over the ops of a category (None: all), views excluded by construction."""
        b = f = c = 0
        for name, r in self.rows.items():
            k = category(name)
            if (cat is None or k == cat) and k not in exclude:
                b, f, c = b + r.bytes, f + r.flops, c + r.calls
        return b, f, c

    def only(self, cats: Sequence[str]) -> "Ledger":
        out = Ledger()
        for name, r in self.rows.items():
            if category(name) in cats:
                out.rows[name] = OpRow(r.calls, r.bytes_read, r.bytes_written, r.flops)
        out.calls = [c for c in self.calls if category(c[0]) in cats]
        return out


class Counter(TorchDispatchMode):
    """Records every op dispatched below autograd into a :class:`Ledger` (see the module docstring)."""

    def __init__(self, ledger: Optional[Ledger] = None):
        super().__init__()
        self.ledger = ledger if ledger is not None else Ledger()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = op_name(func)
        if name in _FREE_OPS or is_view(func):
            return out
        skip = _written_only(func, name, args, kwargs)
        ins = [t for t in _tensors((args, kwargs)) if id(t) not in skip]
        outs = _tensors(out)
        written = sum(tensor_bytes(t) for t in outs)
        if name == "aten.embedding":  # a gather reads the rows it returns (and the indices), not the table
            read = written + tensor_bytes(args[1])
        else:
            read = sum(tensor_bytes(t) for t in ins)
        if not outs:  # an in-place op returning nothing (the _foreach_* family): it wrote its first argument
            written = sum(tensor_bytes(t) for t in _tensors(args[:1]))
        cat = category(name)
        flops = _mm_flops(name, args, out) if cat == "matmul" else _attention_flops(name, args) if cat == "attention" else 0.0
        self.ledger.add(name, read, written, flops)
        return out


# ---------------------------------------------------------------------------------------------- counting
def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                _orig=torch.nn.functional.scaled_dot_product_attention):
    """SDPA as a GPU runs it for diffusers' calls (no mask, no dropout, Dh <= 256: the flash kernel);
    anything else takes SDPA itself."""
    if attn_mask is None and dropout_p == 0.0 and not enable_gqa and query.shape[-1] <= 256 \
            and query.dtype in (torch.bfloat16, torch.float16) and query.shape[-1] == value.shape[-1]:
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, is_causal, False,
                                                                  scale=scale)[0]
    return _orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                 enable_gqa=enable_gqa)


@contextlib.contextmanager
def gpu_dispatch(device: str = "cpu", capability: Tuple[int, int] = (9, 0)) -> Iterator[None]:
    """Make fake tensors on ``device`` dispatch as on a GPU without one.

    * SDPA runs as its flash kernel (``aten._scaled_dot_product_flash_attention``), the kernel a GPU
      picks for diffusers' calls; off a GPU SDPA would decompose into the math path (L x L scores).
    * ``device="cpu"`` (the default; autograd's engine cannot run a backward of fake CUDA tensors
      without a CUDA driver): ditfast's Triton family is made selectable for CPU tensors, as it is
      under ``TRITON_INTERPRET=1`` in the tests, so ``use_backend("triton")`` takes the same custom
      ops a GPU takes; and the CUDA-only GELU matmul epilogue of ``ditfast.nn.functional``
      (``GELU_TANH_EPILOGUE_DEVICES``) is taken as on CUDA. No kernel runs: fake tensors run the ops' registered fake kernels. The
      probe results and choices made meanwhile are forgotten on exit.
    * ``device="cuda"`` without a GPU: ditfast's choice is told a compute capability (it would ask
      the absent driver). Only inference can be counted so; tests check it equals the CPU count.
    """
    from .. import _backend
    from ..nn import functional as nnf

    saved_epilogue = set(nnf.GELU_TANH_EPILOGUE_DEVICES)
    if device == "cpu":  # the fused GELU epilogue of CUDA (nn/functional.py) for the CPU stand-ins
        nnf.GELU_TANH_EPILOGUE_DEVICES.add("cpu")
    saved_sdpa = torch.nn.functional.scaled_dot_product_attention
    saved_probes, saved_caps = dict(_backend._PROBED), dict(_backend._CAPABILITY)
    saved_env = os.environ.get("TRITON_INTERPRET")
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
        for key in [k for k in _backend._PROBED if k[1] == "cpu"]:
            del _backend._PROBED[key]
    elif not torch.cuda.is_available():
        for index in (-1, 0):
            _backend._CAPABILITY.setdefault(index, capability)
    _backend.clear_cache()
    torch.nn.functional.scaled_dot_product_attention = _flash_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = saved_sdpa
        nnf.GELU_TANH_EPILOGUE_DEVICES.clear()
        nnf.GELU_TANH_EPILOGUE_DEVICES.update(saved_epilogue)
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
        _backend._PROBED.clear()
        _backend._PROBED.update(saved_probes)
        _backend._CAPABILITY.clear()
        _backend._CAPABILITY.update(saved_caps)
        _backend.clear_cache()  # no choice made for the pretended GPU outlives it


def count(step: Callable[[], object], *, train: bool) -> Ledger:
    """The ledger of one call of ``step`` (inference: under no_grad; training: forward, then backward
    of every parameter from a gradient of the first output). Call inside a FakeTensorMode."""
    ledger = Ledger()
    if not train:
        with torch.no_grad(), Counter(ledger):
            step()
        return ledger
    with torch.enable_grad():
        with Counter(ledger):
            out = step()
            while isinstance(out, (tuple, list)):  # (sample,) or, for Z-Image, ([sample per image],)
                out = out[0]
            out.backward(torch.empty_like(out))  # empty_like writes nothing: the seed gradient is free
    return ledger


# ---------------------------------------------------------------------------------------------- models
@dataclass
class ModelCase:
    """One model at one size: how to build it and its inputs (inside the fake mode, on its device)."""

    name: str
    label: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict]
    # padded text tokens at the end of every sample's prompt (its attention mask keeps the rest): fake
    # tensors hold no mask values, so the patched blocks are told the prefix lengths the real mask gives
    text_padding: int = 0


def _ids(Li: int) -> torch.Tensor:
    side, p = max(1, int(Li ** 0.5)), torch.arange(Li)
    return torch.stack([torch.zeros_like(p), p // side, p % side], -1).float()


def flux_case(*, B=1, Li=4096, Lt=512, double=19, single=38, heads=24, head_dim=128, in_channels=64, ctx=4096,
              pooled=768, axes=(16, 56, 56), label="FLUX.1-dev, 1024² (4096 image + 512 text tokens), batch 1") -> ModelCase:
    def build():
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel(patch_size=1, in_channels=in_channels, num_layers=double, num_single_layers=single,
                                      attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=ctx,
                                      pooled_projection_dim=pooled, guidance_embeds=True, axes_dims_rope=tuple(axes))

    def inputs():
        bf = torch.bfloat16
        return dict(hidden_states=torch.randn(B, Li, in_channels, dtype=bf), encoder_hidden_states=torch.randn(B, Lt, ctx, dtype=bf),
                    pooled_projections=torch.randn(B, pooled, dtype=bf), timestep=torch.full((B,), 0.5, dtype=bf),
                    img_ids=_ids(Li), txt_ids=torch.zeros(Lt, 3), guidance=torch.full((B,), 3.5, dtype=bf),
                    return_dict=False)

    return ModelCase("flux", label, build, inputs)


def sd3_case(*, B=2, S=128, Lc=333, layers=38, heads=38, head_dim=64, in_channels=16, ctx=4096, pooled=2048,
             pos_max=192, qk_norm="rms_norm",
             label="SD3.5-large, 1024² (4096 image + 333 text tokens), batch 2 (CFG)") -> ModelCase:
    def build():
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel(sample_size=S, patch_size=2, in_channels=in_channels, num_layers=layers,
                                     attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=ctx,
                                     caption_projection_dim=heads * head_dim, pooled_projection_dim=pooled,
                                     out_channels=in_channels, pos_embed_max_size=pos_max, qk_norm=qk_norm)

    def inputs():
        bf = torch.bfloat16
        return dict(hidden_states=torch.randn(B, in_channels, S, S, dtype=bf), encoder_hidden_states=torch.randn(B, Lc, ctx, dtype=bf),
                    pooled_projections=torch.randn(B, pooled, dtype=bf), timestep=torch.full((B,), 500.0, dtype=bf),
                    return_dict=False)

    return ModelCase("sd3.5", label, build, inputs)


def dit_case(*, B=2, S=32, layers=28, heads=16, head_dim=72, in_channels=4,
             label="DiT-XL/2, 256² (256 tokens), batch 2 (CFG)") -> ModelCase:
    def build():
        from diffusers import DiTTransformer2DModel

        return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_channels,
                                     out_channels=2 * in_channels, num_layers=layers, sample_size=S, patch_size=2,
                                     num_embeds_ada_norm=1000, norm_type="ada_norm_zero")

    def inputs():
        return dict(hidden_states=torch.randn(B, in_channels, S, S, dtype=torch.bfloat16),
                    timestep=torch.full((B,), 500, dtype=torch.long), class_labels=torch.zeros(B, dtype=torch.long),
                    return_dict=False)

    return ModelCase("dit-xl-2", label, build, inputs)


def qwen_case(*, B=1, side=83, Lt=512, layers=60, heads=24, head_dim=128, in_channels=64, ctx=3584,
              label="Qwen-Image, 1328² (6889 image + 512 text tokens), batch 1") -> ModelCase:
    """Qwen-Image at 1328² (latent 166², 2x2 patches: 83 x 83 tokens); a 512-token prompt, as FLUX's row;
    no text mask (an all-True mask is dropped by the patch, any other runs diffusers' forward)."""
    def build():
        from diffusers import QwenImageTransformer2DModel

        return QwenImageTransformer2DModel(patch_size=2, in_channels=in_channels, out_channels=in_channels // 4,
                                           num_layers=layers, attention_head_dim=head_dim, num_attention_heads=heads,
                                           joint_attention_dim=ctx)

    def inputs():
        bf = torch.bfloat16
        return dict(hidden_states=torch.randn(B, side * side, in_channels, dtype=bf),
                    encoder_hidden_states=torch.randn(B, Lt, ctx, dtype=bf), timestep=torch.full((B,), 0.5, dtype=bf),
                    img_shapes=[(1, side, side)] * B, return_dict=False)

    return ModelCase("qwen-image", label, build, inputs)


def zimage_case(*, B=1, side=128, Lt=512, layers=30, refiners=2, dim=3840, heads=30, in_channels=16, cap=2560,
                label="Z-Image (Turbo / Base), 1024² (4096 image + 512 caption tokens), batch 1") -> ModelCase:
    """Z-Image at 1024² (latent 128², 2x2 patches: 64 x 64 tokens), a 512-token caption; its two noise and
    two caption refiners included."""
    def build():
        from diffusers import ZImageTransformer2DModel

        return ZImageTransformer2DModel(in_channels=in_channels, dim=dim, n_layers=layers, n_refiner_layers=refiners,
                                        n_heads=heads, n_kv_heads=heads, cap_feat_dim=cap)

    def inputs():
        bf = torch.bfloat16
        return dict(x=[torch.randn(in_channels, 1, side, side, dtype=bf) for _ in range(B)],
                    cap_feats=[torch.randn(Lt, cap, dtype=bf) for _ in range(B)],
                    t=torch.full((B,), 0.5, dtype=bf), return_dict=False)

    return ModelCase("z-image", label, build, inputs)


def wan_case(*, B=1, frames=21, h=90, w=160, Lt=512, layers=40, heads=40, head_dim=128, ffn=13824, in_channels=16,
             text=4096, label="Wan 2.1 T2V-14B, 720p 81 frames (21 x 45 x 80 = 75600 tokens, 512 text), batch 1") -> ModelCase:
    """Wan 2.1-14B at 1280x720, 81 frames: latent 21 x 90 x 160, patches (1, 2, 2)."""
    def build():
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                                     in_channels=in_channels, out_channels=in_channels, text_dim=text, freq_dim=256,
                                     ffn_dim=ffn, num_layers=layers, cross_attn_norm=True, eps=1e-6)

    def inputs():
        bf = torch.bfloat16
        return dict(hidden_states=torch.randn(B, in_channels, frames, h, w, dtype=bf),
                    timestep=torch.full((B,), 500, dtype=torch.long),
                    encoder_hidden_states=torch.randn(B, Lt, text, dtype=bf), return_dict=False)

    return ModelCase("wan-14b", label, build, inputs)


def flux2_case(*, B=1, Li=4096, Lt=512, double=8, single=48, heads=48, head_dim=128, in_channels=128, ctx=15360,
               label="FLUX.2-dev, 1024² (4096 image + 512 text tokens), batch 1") -> ModelCase:
    """FLUX.2-dev at 1024² (64 x 64 latent tokens of 128 channels), a 512-token prompt, guidance embedded."""
    def build():
        from diffusers import Flux2Transformer2DModel

        return Flux2Transformer2DModel(in_channels=in_channels, num_layers=double, num_single_layers=single,
                                       attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=ctx)

    def inputs():
        bf = torch.bfloat16
        side, p = max(1, int(Li ** 0.5)), torch.arange(Li)
        img_ids = torch.stack([torch.zeros_like(p), p // side, p % side, torch.zeros_like(p)], -1).float()
        txt_ids = torch.stack([torch.zeros(Lt), torch.zeros(Lt), torch.zeros(Lt), torch.arange(Lt).float()], -1)
        return dict(hidden_states=torch.randn(B, Li, in_channels, dtype=bf), encoder_hidden_states=torch.randn(B, Lt, ctx, dtype=bf),
                    timestep=torch.full((B,), 0.5, dtype=bf), img_ids=img_ids, txt_ids=txt_ids,
                    guidance=torch.full((B,), 4.0, dtype=bf), return_dict=False)

    return ModelCase("flux2-dev", label, build, inputs)


def hunyuanvideo_case(*, B=1, frames=33, h=90, w=160, Lt=256, valid=77, double=20, single=40, heads=24,
                      head_dim=128, in_channels=16, text=4096, pooled=768,
                      label="HunyuanVideo 1.0, 720p 129 frames (33 x 45 x 80 = 118800 tokens; a 77-token prompt "
                            "padded to 256), batch 1") -> ModelCase:
    """HunyuanVideo at 1280x720, 129 frames: latent 33 x 90 x 160, patches (1, 2, 2), guidance embedded; the
    prompt's mask keeps its first ``valid`` of ``Lt`` tokens (the model extends it over [video; text])."""
    def build():
        from diffusers import HunyuanVideoTransformer3DModel

        return HunyuanVideoTransformer3DModel(in_channels=in_channels, out_channels=in_channels,
                                              num_attention_heads=heads, attention_head_dim=head_dim,
                                              num_layers=double, num_single_layers=single, text_embed_dim=text,
                                              pooled_projection_dim=pooled)

    def inputs():
        bf = torch.bfloat16
        mask = torch.zeros(B, Lt, dtype=torch.long)
        mask[:, :valid] = 1
        return dict(hidden_states=torch.randn(B, in_channels, frames, h, w, dtype=bf),
                    timestep=torch.full((B,), 500, dtype=torch.long),
                    encoder_hidden_states=torch.randn(B, Lt, text, dtype=bf), encoder_attention_mask=mask,
                    pooled_projections=torch.randn(B, pooled, dtype=bf), guidance=torch.full((B,), 6000.0, dtype=bf),
                    return_dict=False)

    return ModelCase("hunyuanvideo", label, build, inputs, text_padding=Lt - valid)


def model_cases() -> List[ModelCase]:
    return [flux_case(), sd3_case(), dit_case(), qwen_case(), flux2_case(), zimage_case(), wan_case(),
            hunyuanvideo_case()]


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    try:
        from diffusers.utils import logging as dlog
    except ImportError:
        yield
        return
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def model_ledgers(case: ModelCase, *, modes: Sequence[str] = ("inference", "training"),
                  backend: str = "triton", device: str = "cpu") -> Dict[str, Dict[str, Ledger]]:
    """{mode: {"eager": Ledger, "patched": Ledger, "floor": Ledger}} for one model, bf16 fake tensors
    on ``device`` dispatching as on a GPU (:func:`gpu_dispatch`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import ditfast
    from ditfast.integrations import _common

    out: Dict[str, Dict[str, Ledger]] = {}
    dtype = torch.get_default_dtype()
    with FakeTensorMode(), gpu_dispatch(device), _quiet_diffusers():
        with torch.device(device):  # only while building (the device context slows every later op)
            torch.set_default_dtype(torch.bfloat16)  # bf16 parameters at construction (fake tensors refuse .to's swap)
            try:
                model = case.build()
            finally:
                torch.set_default_dtype(dtype)
            inputs = case.inputs()
        for mode in modes:
            out[mode] = {"eager": count(lambda: model(**inputs), train=mode == "training")}
            for p in model.parameters():
                p.grad = None
        ditfast.patch(model)
        pad = case.text_padding
        masks = _common.assume_prefix_lengths(
            lambda keep: tuple(keep.shape[1] - pad for _ in range(keep.shape[0])) if pad else None)
        with ditfast.use_backend(backend), masks:
            for mode in modes:
                patched = count(lambda: model(**inputs), train=mode == "training")
                out[mode]["patched"] = patched
                out[mode]["floor"] = patched.only(("matmul", "attention"))
                for p in model.parameters():
                    p.grad = None
    return out


# ---------------------------------------------------------------------------------------------- peaks
def _device_slug(name: str) -> str:
    from .timing import slug

    return slug(name)


def newest_results(device: str, root: Optional[str] = None) -> Optional[str]:
    """The newest ``bench_*.json`` of a GPU run of ``device`` under benchmarks/results/<device>/, or None."""
    root = root or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks", "results")
    files = [f for f in glob.glob(os.path.join(root, _device_slug(device), "**", "bench_*.json"), recursive=True)]
    good = []
    for f in files:
        try:
            with open(f) as fh:
                meta = json.load(fh).get("meta", {})
        except (OSError, ValueError):
            continue
        if meta.get("mode") == "gpu":
            good.append(f)
    return max(good, key=os.path.getmtime) if good else None


def peaks_for(device: str, results_root: Optional[str] = None) -> dict:
    """Bandwidth (GB/s), matmul and attention TFLOP/s: measured (the newest GPU results file) or spec values."""
    spec = SPEC_PEAKS.get(_device_slug(device))
    path = newest_results(device, results_root)
    if path is None:
        if spec is None:
            raise SystemExit(f"no GPU results file for {device!r} under benchmarks/results/ and no spec values "
                             f"for it; spec values exist for {', '.join(SPEC_PEAKS)}")
        return dict(spec, device=_device_slug(device), measured=False)
    with open(path) as f:
        res = json.load(f)
    pk = res.get("peaks", {})
    attn = [v["fwd"]["tflops"] for c in res.get("results", []) if c.get("level") == "attention"
            for v in c.get("variants", []) if (v.get("fwd") or {}).get("tflops")]
    fallback = spec or {"attention_tflops": pk.get("matmul", {}).get("tflops")}
    return {"bandwidth_gbps": pk["copy"]["gbps"], "matmul_tflops": pk["matmul"]["tflops"],
            "attention_tflops": max(attn) if attn else fallback["attention_tflops"], "device": _device_slug(device),
            "measured": True, "source": f"measured peaks of {os.path.relpath(path)} (copy, matmul"
                                        f"{', best attention forward' if attn else '; attention: spec value'})"}


def predict(ledger: Ledger, peaks: dict) -> Dict[str, float]:
    """Predicted seconds per category (roofline per op call); fills each row's time_s."""
    bw = peaks["bandwidth_gbps"] * 1e9
    rate = {"matmul": peaks["matmul_tflops"] * 1e12, "attention": peaks["attention_tflops"] * 1e12}
    per_cat = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for r in ledger.rows.values():
        r.time_s = 0.0
    for name, nbytes, flops in ledger.calls:
        cat = category(name)
        t = max(nbytes / bw, flops / rate[cat] if cat in rate else 0.0)
        ledger.rows[name].time_s += t
        per_cat[cat] += t
    per_cat["total"] = sum(per_cat.values())
    return per_cat


# ---------------------------------------------------------------------------------------------- report
def ledger_record(ledger: Ledger, peaks: dict) -> dict:
    times = predict(ledger, peaks)
    rows = sorted(ledger.rows.items(), key=lambda kv: -kv[1].bytes)
    out_b, _, out_c = ledger.total(exclude=("matmul", "attention"))
    return {
        "bytes_outside_matmul_attention": out_b,
        "calls_outside_matmul_attention": out_c,
        "matmul": dict(zip(("bytes", "flops", "calls"), ledger.total("matmul"))),
        "attention": dict(zip(("bytes", "flops", "calls"), ledger.total("attention"))),
        "predicted_ms": {k: v * 1e3 for k, v in times.items()},
        "ops": [{"op": n, "category": category(n), "calls": r.calls, "bytes_read": r.bytes_read,
                 "bytes_written": r.bytes_written, "bytes": r.bytes, "flops": r.flops,
                 "predicted_ms": r.time_s * 1e3} for n, r in rows],
    }


def build_report(cases: Sequence[ModelCase], *, device: str = "h100", modes=("inference", "training"),
                 backend: str = "triton", results_root: Optional[str] = None, stream=None) -> dict:
    from .timing import git_commit, utc_now, versions

    peaks = peaks_for(device, results_root)
    commit, dirty = git_commit()
    report = {"schema": SCHEMA, "note": PREDICTION_NOTE,
              "meta": {"date": utc_now(), "commit": commit, "dirty": dirty, "versions": versions(),
                       "dtype": "bfloat16", "patched_backend": backend,
                       "counting": "FakeTensorMode + TorchDispatchMode (ditfast/bench/ledger.py docstring: the rules)"},
              "peaks": peaks, "models": []}
    for case in cases:
        t0 = time.monotonic()
        ledgers = model_ledgers(case, modes=modes, backend=backend)
        rec = {"model": case.name, "label": case.label, "count_s": None, "modes": {}}
        for mode, by_variant in ledgers.items():
            rec["modes"][mode] = {v: ledger_record(lg, peaks) for v, lg in by_variant.items()}
        rec["count_s"] = time.monotonic() - t0
        report["models"].append(rec)
        if stream is not None:
            stream.write(f"counted {case.name} in {rec['count_s']:.1f} s\n")
            stream.flush()
    return report


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f}"


def render(report: dict, *, top: int = 6) -> str:
    pk = report["peaks"]
    lines = [f"ditfast model-step ledger ({report['meta']['dtype']}, patched = ditfast's "
             f"{report['meta']['patched_backend']} family)",
             f"{report['note']}",
             f"peaks: {pk['bandwidth_gbps']:.0f} GB/s, matmul {pk['matmul_tflops']:.0f} TFLOP/s, attention "
             f"{pk['attention_tflops']:.0f} TFLOP/s -- {pk['source']}", ""]
    head = f"{'model':<10} {'step':<10} {'variant':<8} {'GB other':>9} {'calls':>6} {'matmul TF':>9} {'attn TF':>8} " \
           f"{'pred. ms':>9}  largest outside matmul + attention (GB)"
    lines += [head, "-" * len(head)]
    for m in report["models"]:
        for mode, variants in m["modes"].items():
            for v, r in variants.items():
                others = [o for o in r["ops"] if o["category"] == "other"][:top]
                big = ", ".join(f"{o['op'].split('.', 1)[1]} {_gb(o['bytes'])}" for o in others)
                lines.append(f"{m['model']:<10} {mode:<10} {v:<8} {_gb(r['bytes_outside_matmul_attention']):>9} "
                             f"{r['calls_outside_matmul_attention']:>6} {r['matmul']['flops'] / 1e12:>9.1f} "
                             f"{r['attention']['flops'] / 1e12:>8.1f} {r['predicted_ms']['total']:>9.1f}  {big}")
    return "\n".join(lines)


def make_plot(report: dict, path: str, *, top: int = 7) -> str:
    """Stacked bars: GB outside matmuls + attention by op, and the predicted ms by category."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    bars = [(f"{m['model']}\n{mode}\n{v}", r) for m in report["models"] for mode, vs in m["modes"].items()
            for v, r in vs.items() if v != "floor"]
    totals = defaultdict(float)
    for _, r in bars:
        for o in r["ops"]:
            if o["category"] == "other":
                totals[o["op"]] += o["bytes"]
    names = [n for n, _ in sorted(totals.items(), key=lambda kv: -kv[1])[:top]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(10, 1.5 * len(bars)), 6))
    x = range(len(bars))
    bottom = [0.0] * len(bars)
    for n in names + ["rest"]:
        vals = [sum(o["bytes"] for o in r["ops"] if o["category"] == "other" and
                    ((o["op"] == n) if n != "rest" else o["op"] not in names)) / 1e9 for _, r in bars]
        ax1.bar(x, vals, bottom=bottom, label=n.replace(".", "::"))  # "aten::_to_copy": a label starting with "_" would be hidden
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax1.set_xticks(list(x), [b for b, _ in bars], fontsize=7)
    ax1.set_ylabel("GB per step outside matmuls + attention")
    ax1.legend(fontsize=7)
    ax1.set_title("bytes moved (counted)")
    allbars = [(f"{m['model']}\n{mode}\n{v}", r) for m in report["models"] for mode, vs in m["modes"].items()
               for v, r in vs.items()]
    x2 = range(len(allbars))
    bottom = [0.0] * len(allbars)
    for cat in ("matmul", "attention", "other"):
        vals = [r["predicted_ms"][cat] for _, r in allbars]
        ax2.bar(x2, vals, bottom=bottom, label=cat)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax2.set_xticks(list(x2), [b for b, _ in allbars], fontsize=6)
    ax2.set_ylabel("ms per step (PREDICTION)")
    ax2.set_title(f"predicted step time at {report['peaks']['device']} peaks (PREDICTION, not measured)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ditfast.bench ledger",
                                description="bytes, FLOPs and calls per op of full-size model steps (counted under "
                                            "FakeTensorMode), with predicted step times. " + PREDICTION_NOTE)
    p.add_argument("--models", default="all", help="comma list of flux, sd3.5, dit-xl-2, qwen-image, flux2-dev, z-image, wan-14b, "
                                             "hunyuanvideo (default: all)")
    p.add_argument("--modes", default="inference,training", help="inference, training or both (default)")
    p.add_argument("--device", default="h100", help=f"whose peaks predict the times: {', '.join(SPEC_PEAKS)} "
                                                    "or any device with a results folder (default: h100)")
    p.add_argument("--backend", default="triton", help="the ditfast family the patched model runs (default: triton)")
    p.add_argument("--json", default=None, help="where the JSON goes (default: ditfast-ledger/ledger_<device>.json)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--top", type=int, default=6, help="largest ops shown per row")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    cases = {c.name: c for c in model_cases()}
    names = list(cases) if args.models == "all" else [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [n for n in names if n not in cases]
    if bad:
        raise SystemExit(f"unknown model(s) {bad}; choose from {', '.join(cases)}")
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if any(m not in ("inference", "training") for m in modes):
        raise SystemExit(f"--modes takes inference and/or training, got {args.modes!r}")
    report = build_report([cases[n] for n in names], device=args.device, modes=modes, backend=args.backend,
                          stream=sys.stderr)
    print(render(report, top=args.top))
    path = args.json or os.path.join("ditfast-ledger", f"ledger_{report['peaks']['device']}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    print(f"\nledger: {path}")
    if not args.no_plots:
        print(make_plot(report, os.path.splitext(path)[0] + ".png"))
    return 0
