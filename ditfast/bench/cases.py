"""What the benchmark measures: the shapes per level, and the bytes / FLOPs formulas behind GB/s and TFLOP/s.

Shapes are the models' real ones (docs/upstream.md): FLUX.1-dev at 1024 px, SD3.5 with CFG, DiT-XL/2.
On CPU (the smoke) tiny, deliberately awkward ones run instead (D = 200, L = 77, Dh = 72).

Memory-bound ops are scored in GB/s: the bytes that *must* move (every input read once, every output
written once, nothing else) divided by the time. Attention is scored in TFLOP/s with the usual
4·B·H·Lq·Lk·Dh forward count (two matmuls) and 2.5× that for the backward (flash-attention's
convention). Blocks and models are scored in TFLOP/s of their matmuls (2·M·N·K per linear layer plus
the attention count; elementwise work is not counted); their backward costs 2× the linear forward.
All formulas are pure functions of the shapes so the tests can check them without a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

LEVELS = ("ops", "attention", "blocks", "train", "models")

# fp32 cos/sin tables of RoPE (ditfast.ops.rope_freqs returns fp32).
TABLE_BYTES = 4

ATTN_BWD_FACTOR = 2.5  # backward FLOPs of attention / forward FLOPs (flash-attention's convention)
LINEAR_BWD_FACTOR = 2.0  # backward of a matmul = two matmuls of the forward's size


# --------------------------------------------------------------------------------------------- bytes
def modulate_bytes(op: str, B: int, L: int, D: int, elt: int) -> Dict[str, int]:
    """Bytes that must move for the adaLN ops on x (B, L, D) with (B, D) shift/scale/gate.

    ``elt`` is the element size of x and of the modulation vectors. Forward: read every input once,
    write every output once. Backward: read the saved activations and the output gradients, write the
    input gradients; the (B, D) gradients of shift/scale/gate are written once. The residual stream's
    gradient of ``x + gate * y`` is the incoming gradient itself (no copy), so it is not counted.
    """
    N, V = B * L * D, B * D  # activation elements, modulation-vector elements
    if op == "norm_modulate":  # x, shift, scale -> h
        fwd = 2 * N + 2 * V
        bwd = 3 * N + 3 * V  # read x, dh, scale; write dx, dshift, dscale
    elif op == "norm_modulate_dual":  # x, (shift, scale) x2 -> h1, h2
        fwd = 3 * N + 4 * V
        bwd = 4 * N + 6 * V  # read x, dh1, dh2, scale1, scale2; write dx and four vector grads
    elif op == "gated_residual":  # x, y, gate -> x + gate * y
        fwd = 3 * N + V
        bwd = 3 * N + 2 * V  # read dout, y, gate; write dy, dgate (dx = dout)
    elif op == "gated_residual_norm_modulate":  # x, y, gate, shift, scale -> x_new, h
        fwd = 4 * N + 3 * V
        bwd = 6 * N + 5 * V  # read dx_new, dh, x_new, y, gate, scale; write dx, dy, dgate, dshift, dscale
    else:
        raise ValueError(f"no byte count for op {op!r}")
    return {"fwd": fwd * elt, "fwd_bwd": (fwd + bwd) * elt}


def gelu_backward_bytes(T: int, N: int, elt: int) -> Dict[str, int]:
    """gelu_tanh_backward on (T, N): read dy and pre, write dpre and the (N,) bias gradient. It is a
    backward computation itself: forward only ("fwd" is its one direction)."""
    return {"fwd": (3 * T * N + N) * elt}


def swiglu_bytes(T: int, N: int, elt: int) -> Dict[str, int]:
    """swiglu of a packed (T, 2N) [gate | up]: forward reads 2N and writes N per token; backward reads dy, gate
    and up (3N) and writes both halves' gradients (2N)."""
    fwd = 3 * T * N * elt
    return {"fwd": fwd, "fwd_bwd": fwd + 5 * T * N * elt}


def head_op_bytes(op: str, B: int, L: int, H: int, Dh: int, elt: int, *, table_rows: Optional[int] = None) -> Dict[str, int]:
    """Bytes that must move for the per-head ops on (B, L, H, Dh) tensors.

    rms_norm: x and a weight of Dh. apply_rope: x and fp32 cos/sin tables of (table_rows, Dh/2)
    (table_rows = L for shared tables, B·L for per-sample ones). qk_norm_rope: q and k, two weights,
    the tables. Backward reads the saved inputs and output gradients and writes input gradients.
    """
    N = B * L * H * Dh
    rows = L if table_rows is None else table_rows
    tables = 2 * rows * (Dh // 2) * TABLE_BYTES  # cos and sin
    if op == "rms_norm":
        fwd = (2 * N + Dh) * elt
        bwd = (3 * N + 2 * Dh) * elt  # read x, dy, w; write dx, dw
    elif op == "apply_rope":
        fwd = 2 * N * elt + tables
        bwd = 2 * N * elt + tables  # read dy, write dx (a rotation by the negative angle)
    elif op == "qk_norm_rope":
        fwd = (4 * N + 2 * Dh) * elt + tables
        bwd = (6 * N + 4 * Dh) * elt + tables  # read q, k, dq', dk', weights; write dq, dk, dweights
    else:
        raise ValueError(f"no byte count for op {op!r}")
    return {"fwd": fwd, "fwd_bwd": fwd + bwd}


# --------------------------------------------------------------------------------------------- FLOPs
def attention_flops(B: int, H: int, Lq: int, Lk: int, Dh: int) -> Dict[str, float]:
    """4·B·H·Lq·Lk·Dh for the forward (QKᵀ and PV, 2 FLOPs per multiply-add); backward 2.5× that."""
    fwd = 4.0 * B * H * Lq * Lk * Dh
    return {"fwd": fwd, "fwd_bwd": fwd * (1 + ATTN_BWD_FACTOR)}


def linear_flops(tokens: int, d_in: int, d_out: int) -> float:
    """2·tokens·d_in·d_out: one matmul of a Linear layer (bias adds are not counted)."""
    return 2.0 * tokens * d_in * d_out


def _combine(linear: float, attn_fwd: float) -> Dict[str, float]:
    return {
        "fwd": linear + attn_fwd,
        "fwd_bwd": linear * (1 + LINEAR_BWD_FACTOR) + attn_fwd * (1 + ATTN_BWD_FACTOR),
        "linear_fwd": linear,
        "attention_fwd": attn_fwd,
    }


def block_flops(block: str, dims: Dict[str, int]) -> Dict[str, float]:
    """Matmul FLOPs of one block (linear layers + attention); ``linear_fwd`` is the linear part alone.

    dims: B, D, H, M (MLP hidden) and the token counts: L (DiTBlock, SingleStreamBlock),
    Li / Lt (DoubleStreamBlock: image / text), Lx / Lc (JointBlock: image / context).
    """
    B, D, H, M = dims["B"], dims["D"], dims["H"], dims["M"]
    Dh = D // H

    def stream(L: int, chunks: int) -> float:  # a DiT-like stream: adaLN, qkv, proj, MLP
        return (linear_flops(B, D, chunks * D) + linear_flops(B * L, D, 3 * D) + linear_flops(B * L, D, D)
                + linear_flops(B * L, D, M) + linear_flops(B * L, M, D))

    if block == "DiTBlock":
        L = dims["L"]
        return _combine(stream(L, 6), attention_flops(B, H, L, L, Dh)["fwd"])
    if block == "DoubleStreamBlock":
        Li, Lt = dims["Li"], dims["Lt"]
        L = Li + Lt
        return _combine(stream(Li, 6) + stream(Lt, 6), attention_flops(B, H, L, L, Dh)["fwd"])
    if block == "JointBlock":
        Lx, Lc = dims["Lx"], dims["Lc"]
        L = Lx + Lc
        return _combine(stream(Lx, 6) + stream(Lc, 6), attention_flops(B, H, L, L, Dh)["fwd"])
    if block == "SingleStreamBlock":
        L = dims["L"]
        linear = linear_flops(B, D, 3 * D) + linear_flops(B * L, D, 3 * D + M) + linear_flops(B * L, D + M, D)
        return _combine(linear, attention_flops(B, H, L, L, Dh)["fwd"])
    raise ValueError(f"no FLOP count for block {block!r}")


def rate(work: Optional[float], ms: Optional[float], metric: str) -> Optional[float]:
    """GB/s (work in bytes) or TFLOP/s (work in FLOPs) for a time in milliseconds."""
    if work is None or ms is None or ms <= 0:
        return None
    per_s = work / (ms * 1e-3)
    return per_s / 1e9 if metric == "GB/s" else per_s / 1e12


# --------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One row group of the results: one op / block / model at one shape.

    ``dims`` are the named sizes; ``work`` the bytes or FLOPs for ``metric`` ("GB/s" or "TFLOP/s"),
    per direction ("fwd", "fwd_bwd"); ``graph`` asks for the CUDA-graph column (launch-bound shapes);
    ``target`` marks the shapes the performance targets are judged at (they run first).
    """

    level: str
    name: str
    label: str
    dims: Dict[str, int]
    metric: str
    work: Dict[str, float] = field(default_factory=dict)
    graph: bool = False
    target: bool = False
    params: Dict[str, object] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.level}/{self.name}/{self.label}"


# Real shapes (docs/upstream.md) ---------------------------------------------------------------------
FLUX = dict(B=1, L=4608, D=3072)  # FLUX.1-dev @1024: 4096 image + 512 text tokens
FLUX_TXT = dict(B=1, L=512, D=3072)  # its text stream alone: small, launch-bound (CUDA-graph column)
DIT = dict(B=32, L=256, D=1152)  # DiT-XL/2 @256, batch 32
SD35L = dict(B=2, L=4429, D=2432)  # SD3.5-large @1024 with CFG (4096 + 333 tokens)
TINY = dict(B=2, L=77, D=200)  # the CPU smoke: tiny and awkward
MOD_OPS = ("norm_modulate", "gated_residual", "gated_residual_norm_modulate")


def _op_case(name: str, label: str, dims: dict, elt: int, *, graph=False, target=False) -> Case:
    if name == "gelu_tanh_backward":
        work = gelu_backward_bytes(dims["T"], dims["N"], elt)
    elif name == "swiglu":
        work = swiglu_bytes(dims["T"], dims["N"], elt)
    elif "H" in dims:
        work = head_op_bytes(name, dims["B"], dims["L"], dims["H"], dims["Dh"], elt)
    else:
        work = modulate_bytes(name, dims["B"], dims["L"], dims["D"], elt)
    return Case("ops", name, label, dict(dims), "GB/s", work, graph=graph, target=target)


def _heads(d: dict, H: int) -> dict:
    return dict(B=d["B"], L=d["L"], H=H, Dh=d["D"] // H)


def op_cases(elt: int, *, tiny: bool, quick: bool) -> List[Case]:
    if tiny:
        heads = dict(B=2, L=77, H=3, Dh=72)
        cases = [_op_case(op, "tiny", TINY, elt, graph=True, target=True) for op in MOD_OPS]
        sandwich = _op_case("gated_residual_norm_modulate", "tiny sandwich", TINY, elt)
        sandwich.params["sandwich"] = True
        cases += [_op_case("norm_modulate_dual", "tiny", TINY, elt), sandwich,
                  _op_case("gelu_tanh_backward", "tiny", dict(T=77, N=200), elt),
                  _op_case("swiglu", "tiny", dict(T=77, N=200), elt),
                  _op_case("qk_norm_rope", "tiny", heads, elt, graph=True, target=True)]
        return cases if quick else cases + [_op_case(op, "tiny", heads, elt) for op in ("rms_norm", "apply_rope")]
    cases = [_op_case(op, "FLUX-dev", FLUX, elt, target=True) for op in MOD_OPS]
    cases.append(_op_case("qk_norm_rope", "FLUX-dev", _heads(FLUX, 24), elt, target=True))
    # the training backward of the MLP's first Linear: FLUX single block (4608 tokens, hidden 4·3072)
    cases.append(_op_case("gelu_tanh_backward", "FLUX-dev MLP", dict(T=4608, N=12288), elt))
    # FLUX.2-dev's single-block SwiGLU (4608 tokens, 3 x 6144 per half) and Z-Image's (hidden 10240)
    cases.append(_op_case("swiglu", "FLUX.2-dev MLP", dict(T=4608, N=18432), elt))
    cases.append(_op_case("swiglu", "Z-Image MLP", dict(T=4608, N=10240), elt))
    # the adaLN family's options at Z-Image's width (RMSNorm + weight, tanh gate, post-norm): its sandwich blocks
    for op in MOD_OPS:
        c = _op_case(op, "Z-Image sandwich", dict(B=1, L=4608, D=3840), elt)
        c.params["sandwich"] = True
        cases.append(c)
    if quick:
        return cases
    cases += [_op_case(op, "FLUX text", FLUX_TXT, elt, graph=True) for op in MOD_OPS]
    cases.append(_op_case("qk_norm_rope", "FLUX text", _heads(FLUX_TXT, 24), elt, graph=True))
    cases += [_op_case(op, "SD3.5-large CFG", SD35L, elt) for op in MOD_OPS + ("norm_modulate_dual",)]
    cases.append(_op_case("qk_norm_rope", "SD3.5-large CFG", _heads(SD35L, 38), elt))
    cases.append(_op_case("gelu_tanh_backward", "SD3.5-large CFG MLP", dict(T=2 * 4096, N=4 * 2432), elt))
    cases += [_op_case(op, "DiT-XL/2 b32", DIT, elt) for op in ("norm_modulate", "gated_residual_norm_modulate")]
    return cases + [_op_case(op, "FLUX-dev", _heads(FLUX, 24), elt) for op in ("rms_norm", "apply_rope")]


def _attn_case(label: str, B: int, L: int, H: int, Dh: int, *, target=False, graph=False, key_lengths=None) -> Case:
    """key_lengths: per-sample counts of valid keys (a padding mask's prefix); the FLOPs count those keys only."""
    work = attention_flops(B, H, L, L, Dh)
    if key_lengths:
        work = {k: w * sum(key_lengths) / (B * L) for k, w in work.items()}
    return Case("attention", "joint_attention", label, dict(B=B, L=L, H=H, Dh=Dh), "TFLOP/s", work, graph=graph,
                target=target, params=dict(key_lengths=tuple(key_lengths)) if key_lengths else {})


def attention_cases(*, tiny: bool, quick: bool) -> List[Case]:
    if tiny:
        return [_attn_case("tiny", 2, 77, 3, 72, target=True),
                _attn_case("tiny, key lengths", 2, 77, 3, 72, key_lengths=(77, 40))][: 1 if quick else 2]
    cases = [_attn_case("FLUX-dev", 1, 4608, 24, 128, target=True),
             _attn_case("SD3.5-large CFG", 2, 4429, 38, 64, target=True),
             _attn_case("DiT-XL/2 256px", 8, 256, 16, 72, target=True, graph=True),
             _attn_case("DiT-XL/2 512px", 8, 1024, 16, 72),
             # HunyuanVideo / Qwen-Image style: [image; text] with one caption padded (512 -> 77 tokens)
             _attn_case("FLUX-dev shape b2, padded text", 2, 4608, 24, 128, key_lengths=(4608, 4096 + 77))]
    return cases[:1] if quick else cases


def _block_case(name: str, label: str, dims: dict, *, target=True, level="blocks", **params) -> Case:
    work = block_flops(name, dims)
    if params.get("depth"):
        work = {k: v * params["depth"] for k, v in work.items()}
    return Case(level, name, label, dict(dims), "TFLOP/s", work, target=target, params=params)


def block_cases(*, tiny: bool, quick: bool) -> List[Case]:
    if tiny:  # Dh = 64: even (RoPE); axes (8, 28, 28) sum to 64 like FLUX's (16, 56, 56) to 128
        return [_block_case("DiTBlock", "tiny", dict(B=2, L=77, D=72, H=2, M=288)),
                _block_case("DoubleStreamBlock", "tiny", dict(B=2, Li=64, Lt=13, D=128, H=2, M=512), axes_dim=(8, 28, 28)),
                _block_case("SingleStreamBlock", "tiny", dict(B=2, L=77, D=128, H=2, M=512), axes_dim=(8, 28, 28), txt=13),
                _block_case("JointBlock", "tiny", dict(B=2, Lx=64, Lc=13, D=128, H=2, M=512), qk_norm="rms")]
    cases = [_block_case("DoubleStreamBlock", "FLUX-dev", dict(B=1, Li=4096, Lt=512, D=3072, H=24, M=12288),
                         axes_dim=(16, 56, 56)),
             _block_case("SingleStreamBlock", "FLUX-dev", dict(B=1, L=4608, D=3072, H=24, M=12288),
                         axes_dim=(16, 56, 56), txt=512),
             _block_case("JointBlock", "SD3.5-large CFG", dict(B=2, Lx=4096, Lc=333, D=2432, H=38, M=9728), qk_norm="rms"),
             _block_case("DiTBlock", "DiT-XL/2 256px b32", dict(B=32, L=256, D=1152, H=16, M=4608))]
    return cases[:1] if quick else cases


def train_cases(*, tiny: bool, quick: bool) -> List[Case]:
    """A training step (forward + backward, peak memory) of a DiT-XL/2 block stack."""
    if tiny:
        return [_block_case("DiTBlock", "stack of 2, tiny", dict(B=2, L=77, D=72, H=2, M=288), level="train", depth=2)]
    return [] if quick else [_block_case("DiTBlock", "DiT-XL/2 stack of 28, 256px b32",
                                         dict(B=32, L=256, D=1152, H=16, M=4608), level="train", depth=28)]


def model_cases(*, tiny: bool, quick: bool) -> List[Case]:
    """Whole diffusers transformers at the real widths, a few blocks deep (FLOPs counted on the model);
    --quick keeps FLUX only, one double and two single blocks."""
    if tiny:
        return [Case("models", "FluxTransformer2DModel", "tiny", dict(B=1, Li=64, Lt=13, D=32, H=2), "TFLOP/s", target=True,
                     params=dict(double=1, single=1, axes_dim=(4, 6, 6), in_channels=16, ctx=32, pooled=32)),
                Case("models", "SD3Transformer2DModel", "tiny", dict(B=2, S=16, Lc=13, D=32, H=2), "TFLOP/s", target=True,
                     params=dict(layers=2, in_channels=4, ctx=32, pooled=32, qk_norm="rms_norm", pos_max=8))][: 1 if quick else 2]
    double, single = (1, 2) if quick else (2, 4)
    flux = Case("models", "FluxTransformer2DModel", f"FLUX.1-dev widths, {double}/19 double + {single}/38 single blocks",
                dict(B=1, Li=4096, Lt=512, D=3072, H=24), "TFLOP/s", target=True,
                params=dict(double=double, single=single, axes_dim=(16, 56, 56), in_channels=64, ctx=4096, pooled=768))
    return [flux] if quick else [flux, Case(
        "models", "SD3Transformer2DModel", "SD3.5-large widths, 4/38 blocks, CFG", dict(B=2, S=128, Lc=333, D=2432, H=38),
        "TFLOP/s", target=True, params=dict(layers=4, in_channels=16, ctx=4096, pooled=2048, qk_norm="rms_norm", pos_max=192))]


def plan(levels, elt: int, *, tiny: bool, quick: bool) -> List[Case]:
    """The cases to run, in the order of ``levels``: target shapes first (across levels), then the rest."""
    makers = {"ops": lambda: op_cases(elt, tiny=tiny, quick=quick),
              "attention": lambda: attention_cases(tiny=tiny, quick=quick),
              "blocks": lambda: block_cases(tiny=tiny, quick=quick),
              "train": lambda: train_cases(tiny=tiny, quick=quick),
              "models": lambda: model_cases(tiny=tiny, quick=quick)}
    cases = [c for level in dict.fromkeys(levels) for c in makers[level]()]
    return [c for c in cases if c.target] + [c for c in cases if not c.target]
