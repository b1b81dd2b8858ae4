"""A patched diffusers block and the matching ditfast.nn block run the same ditfast ops, in the same order.

Both paths go through ditfast/nn/functional.py; this test is what keeps them there. A
TorchDispatchMode records every ``torch.ops.ditfast.*`` call (its name, then the shapes of its tensor
arguments and its other arguments) and every ``aten.cat`` of (B, L, H, Dh) tensors (a concatenation
of q, k or v), in the forward and in the backward. The ops run under ``use_backend("triton")`` with
gradients enabled, so each of them goes through its custom op (on CPU: the Triton interpreter, which
is why the shapes are tiny). The two blocks share their weights (diffusers' state dict converted with
ditfast.convert) and their outputs and input gradients must agree as well.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ditfast
from conftest import ON_GPU
from ditfast import convert
from ditfast.integrations import patch
from ditfast.nn import DiTBlock, DoubleStreamBlock, JointBlock, SingleStreamBlock

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock  # noqa: E402
from diffusers.models.transformers.transformer_flux import (  # noqa: E402
    FluxPosEmbed,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)

from helpers import assert_close, rand, randomize_  # noqa: E402

D, H, B = 32, 2, 2  # hidden size, heads (Dh = 16), batch
LT, LI = 3, 5  # text / context tokens, image tokens (odd)
AXES = (4, 6, 6)  # FLUX RoPE axes, sum = Dh


class OpRecorder(TorchDispatchMode):
    """Records ditfast custom-op calls and q/k/v-sized concatenations, in call order."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.phase = "forward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "ditfast":
            self.calls.append((self.phase, func.name(), _describe(args), _describe(tuple(sorted(kwargs.items())))))
        elif func.overloadpacket is torch.ops.aten.cat and any(t.dim() == 4 for t in args[0]):
            self.calls.append((self.phase, "aten::cat (q/k/v)", _describe(args), ()))
        return func(*args, **kwargs)


def _describe(obj):
    """Tensors as ("tensor", shape, dtype) (strides differ: packed vs separate projections); the rest as is."""
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype)
    if isinstance(obj, (tuple, list)):
        return tuple(_describe(o) for o in obj)
    if isinstance(obj, float):
        return round(obj, 12)
    return obj


@pytest.fixture(autouse=True)
def _triton():
    if not ON_GPU and not ditfast._backend.availability("triton", "cpu")[0]:
        pytest.skip("the Triton interpreter is not available (TRITON_INTERPRET=1 and triton needed)")
    with ditfast.use_backend("triton"):
        yield


def record(fn, inputs, seed: int = 99):
    """Run fn(*inputs) and a backward through all its outputs under the recorder: (outputs, input grads, calls)."""
    with OpRecorder() as rec:
        outs = fn(*inputs)
        outs = tuple(o for o in (outs if isinstance(outs, tuple) else (outs,)) if o is not None)
        g = torch.Generator().manual_seed(seed)
        cot = [torch.randn(o.shape, generator=g) for o in outs]
        rec.phase = "backward"
        grads = torch.autograd.grad(outs, inputs, cot)
    return outs, grads, rec.calls


def assert_same_sequence(diffusers_fn, d_inputs, ours_fn, o_inputs, attention_steps: int):
    d_out, d_grads, d_calls = record(diffusers_fn, d_inputs)
    o_out, o_grads, o_calls = record(ours_fn, o_inputs)
    assert d_calls == o_calls, "\n".join(
        f"{i}: {a!r:.200}\n   {b!r:.200}" for i, (a, b) in enumerate(zip(d_calls, o_calls)) if a != b
    ) or f"{len(d_calls)} vs {len(o_calls)} calls"
    forward = [name for phase, name, *_ in o_calls if phase == "forward"]
    # the forward concatenates no q, k or v (the backward of per-stream output views may join their grads)
    assert len(forward) > 3 and all(n.startswith("ditfast::") for n in forward), forward
    assert sum("attention" in n and "prepare" not in n for n in forward) == attention_steps, forward
    assert any(phase == "backward" for phase, *_ in o_calls), "the backward ran no ditfast op"
    for i, (a, b) in enumerate(zip(o_out, d_out)):
        assert_close(a, b, f"output {i}")
    for i, (a, b) in enumerate(zip(o_grads, d_grads)):
        assert_close(a, b, f"grad of input {i}")


def inputs(*shapes, seed: int):
    return [rand(*s, seed=seed + i, grad=True) for i, s in enumerate(shapes)]


def flux_ropes():
    txt_ids = torch.zeros(LT, 3)
    img_ids = torch.stack((torch.zeros(LI), torch.arange(LI) // 3, torch.arange(LI) % 3), dim=1).float()
    ids = torch.cat((torch.randint(0, 3, (LT, 3)).float() + txt_ids, img_ids))  # non-zero text ids
    return FluxPosEmbed(theta=10000, axes_dim=list(AXES))(ids), ditfast.ops.rope_freqs(ids, AXES)


# ---------------------------------------------------------------------------------------------- blocks


def test_dit_block():
    ref = randomize_(BasicTransformerBlock(D, H, D // H, activation_fn="gelu-approximate", num_embeds_ada_norm=10,
                                           attention_bias=True, norm_type="ada_norm_zero",
                                           norm_elementwise_affine=False, norm_eps=1e-6), seed=1).eval()
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("norm1.emb.")}
    ours = DiTBlock(D, H)
    ours.load_state_dict(convert.diffusers_to_dit_block(sd), strict=True)
    patch(torch.nn.ModuleList([ref]))
    t, y = torch.tensor([3, 500]), torch.tensor([1, 7])
    with torch.no_grad():
        c = ref.norm1.emb(t, y, hidden_dtype=torch.float32)  # the conditioning diffusers computes in the block
    x = inputs((B, LI, D), seed=2)
    assert_same_sequence(lambda x: ref(x, timestep=t, class_labels=y), [x[0].detach().clone().requires_grad_()],
                         lambda x: ours(x, c), x, attention_steps=1)


@pytest.mark.parametrize("fused", [False, True], ids=["to_q/k/v", "fused-to_qkv"])
def test_flux_double_block(fused):
    ref = randomize_(FluxTransformerBlock(D, H, D // H), seed=3).eval()
    ours = DoubleStreamBlock(D, H, qkv_bias=True)
    ours.load_state_dict(convert.diffusers_to_flux_double_block(ref.state_dict()), strict=True)
    packed_calls = []
    if fused:  # diffusers' fuse_qkv_projections(): the patched block reads the packed to_qkv / to_added_qkv
        ref.attn.fuse_projections()
        for lin in (ref.attn.to_qkv, ref.attn.to_added_qkv):
            lin.register_forward_hook(lambda *_: packed_calls.append(1))
    patch(torch.nn.ModuleList([ref]))
    rope_d, rope_o = flux_ropes()
    img, txt, temb = inputs((B, LI, D), (B, LT, D), (B, D), seed=4)
    d_in = [t.detach().clone().requires_grad_() for t in (img, txt, temb)]
    assert_same_sequence(lambda i, t, e: ref(i, t, e, image_rotary_emb=rope_d)[::-1], d_in,
                         lambda i, t, e: ours(i, t, e, rope_o), [img, txt, temb], attention_steps=1)
    assert len(packed_calls) == (2 if fused else 0)


def test_flux_single_block():
    ref = randomize_(FluxSingleTransformerBlock(D, H, D // H), seed=5).eval()
    ours = SingleStreamBlock(D, H)
    ours.load_state_dict(convert.diffusers_to_flux_single_block(ref.state_dict()), strict=True)
    patch(torch.nn.ModuleList([ref]))
    rope_d, rope_o = flux_ropes()
    x, temb = inputs((B, LT + LI, D), (B, D), seed=6)
    d_in = [t.detach().clone().requires_grad_() for t in (x, temb)]
    # diffusers takes the two streams and concatenates them itself; the ditfast model concatenates
    # once before its single blocks: the same [text, image] sequence, split here as a view
    assert_same_sequence(lambda x, e: torch.cat(ref(x[:, LT:], x[:, :LT], e, image_rotary_emb=rope_d), dim=1), d_in,
                         lambda x, e: ours(x, e, rope_o), [x, temb], attention_steps=1)


@pytest.mark.parametrize("qk_norm,dual,pre_only", [
    pytest.param(None, False, False, id="sd3-medium"),
    pytest.param("rms", False, False, id="qk-norm"),
    pytest.param("rms", True, False, id="dual-attention"),
    pytest.param(None, False, True, id="pre-only"),
    pytest.param("rms", True, True, id="qk-norm-dual-pre-only"),
])
def test_sd3_joint_block(qk_norm, dual, pre_only):
    ref = JointTransformerBlock(D, H, D // H, context_pre_only=pre_only,
                                qk_norm="rms_norm" if qk_norm else None, use_dual_attention=dual)
    ref = randomize_(ref, seed=7).eval()
    ours = JointBlock(D, H, pre_only=pre_only, qk_norm=qk_norm, x_block_self_attn=dual)
    ours.load_state_dict(convert.diffusers_to_sd3_joint_block(ref.state_dict()), strict=True)
    patch(torch.nn.ModuleList([ref]))
    x, ctx, temb = inputs((B, LI, D), (B, LT, D), (B, D), seed=8)
    d_in = [t.detach().clone().requires_grad_() for t in (x, ctx, temb)]
    assert_same_sequence(lambda x, c, e: ref(x, c, e), d_in,
                         lambda x, c, e: ours(c, x, e), [x, ctx, temb], attention_steps=2 if dual else 1)
