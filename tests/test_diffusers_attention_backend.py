"""diffusers' attention backends on patched FLUX blocks (ditfast/integrations/_context_parallel.py).

``model.set_attention_backend(name)`` (the processor's ``_attention_backend``) and the
``attention_backend(name)`` context manager (the registry's active backend) choose the kernel
diffusers' ``dispatch_attention_fn`` runs. A patched block runs ditfast's prepare and then attends
through that dispatch with the chosen backend: the registry's function for it is called once per
block (a spy replaces it), and the output and gradients equal the unpatched model's under the same
backend. diffusers' default, "native", keeps ditfast's own attention (the spy on "native" sees no
call from a patched block). A backend without context-parallel support refuses under context
parallelism. CPU backends: "_native_math" (SDPA's math kernel) and "native".

SD3 and DiT blocks are not concerned: their diffusers processors (``JointAttnProcessor2_0``,
``AttnProcessor2_0``) call SDPA directly and ignore the backend in diffusers too.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from helpers import randomize_  # noqa: E402

CFG = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
           num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=True,
           axes_dims_rope=(4, 6, 6))
BLOCKS = CFG["num_layers"] + CFG["num_single_layers"]
TOL = 1e-5  # fp32: max |patched - unpatched| <= TOL * max(1, max |unpatched|)


@pytest.fixture
def registry():
    """diffusers' backend registry, its active backend restored afterwards (set_attention_backend
    also sets it, for the whole process)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    yield _AttentionBackendRegistry
    _AttentionBackendRegistry.set_active_backend(active)


class Spy:
    """Counts the calls of the registry's function for one backend (restored by ``close``)."""

    def __init__(self, registry, name: str):
        from diffusers.models.attention_dispatch import AttentionBackendName

        self.registry, self.name, self.calls = registry, AttentionBackendName(name), 0
        self.fn = registry._backends[self.name]

        def spy(*args, **kwargs):
            self.calls += 1
            return self.fn(*args, **kwargs)

        registry._backends[self.name] = spy

    def close(self):
        self.registry._backends[self.name] = self.fn


@pytest.fixture
def spies(registry):
    made = []

    def make(name):
        made.append(Spy(registry, name))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() / max(1.0, b.abs().max().item())


def _flux():
    from diffusers import FluxTransformer2DModel

    return randomize_(FluxTransformer2DModel(**CFG), 0).eval()


def _inputs(rows=3, cols=4, text=5):
    g = torch.Generator().manual_seed(1)
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    return dict(hidden_states=torch.randn(2, rows * cols, CFG["in_channels"], generator=g),
                encoder_hidden_states=torch.randn(2, text, CFG["joint_attention_dim"], generator=g),
                pooled_projections=torch.randn(2, CFG["pooled_projection_dim"], generator=g),
                timestep=torch.rand(2, generator=g), guidance=1 + 4 * torch.rand(2, generator=g),
                img_ids=torch.cat((torch.zeros(rows * cols, 1), grid.float()), 1),
                txt_ids=torch.randint(0, 4, (text, 3), generator=g).float())


def _run(model, inputs, cot):
    out = model(**inputs, return_dict=False)[0]
    params = dict(model.named_parameters())
    names = ["transformer_blocks.0.attn.to_q.weight", "transformer_blocks.1.attn.norm_added_k.weight",
             "single_transformer_blocks.0.attn.norm_q.weight", "x_embedder.weight"]
    grads = torch.autograd.grad((out * cot).sum(), [params[n] for n in names])
    return out.detach(), dict(zip(names, grads))


def _compare(ours, ref):
    (out, grads), (ref_out, ref_grads) = ours, ref
    errs = {"out": _err(out, ref_out), **{n: _err(grads[n], ref_grads[n]) for n in grads}}
    bad = {k: e for k, e in errs.items() if e > TOL}
    assert not bad, f"relative errors {bad}"


@pytest.mark.parametrize("how", ["set_attention_backend", "context_manager"])
def test_patched_blocks_run_the_chosen_backend(spies, how):
    import contextlib

    import ditfast
    from diffusers.models.attention_dispatch import attention_backend

    model, inputs = _flux(), _inputs()
    cot = torch.randn(2, 12, CFG["in_channels"], generator=torch.Generator().manual_seed(5))
    math, native = spies("_native_math"), spies("native")
    if how == "set_attention_backend":
        model.set_attention_backend("_native_math")
        chosen = contextlib.nullcontext()
    else:
        chosen = attention_backend("_native_math")
    with chosen, ditfast.use_backend("reference"):
        ref = _run(model, inputs, cot)
        assert (math.calls, native.calls) == (BLOCKS, 0)  # diffusers' own blocks
        ditfast.patch(model)
        ours = _run(model, inputs, cot)
    assert (math.calls, native.calls) == (2 * BLOCKS, 0), "a patched block did not attend through the chosen backend"
    _compare(ours, ref)


def test_default_backend_keeps_ditfast_attention(spies):
    import ditfast
    from ditfast.integrations import _context_parallel

    model, inputs = _flux(), _inputs()
    cot = torch.randn(2, 12, CFG["in_channels"], generator=torch.Generator().manual_seed(5))
    native, math = spies("native"), spies("_native_math")
    with ditfast.use_backend("reference"):
        ref = _run(model, inputs, cot)
        assert native.calls == BLOCKS
        ditfast.patch(model)
        assert all(_context_parallel.diffusers_backend(b.attn) is None
                   for b in (*model.transformer_blocks, *model.single_transformer_blocks))
        ours = _run(model, inputs, cot)
        model.set_attention_backend("native")  # an explicit "native" is the default too
        again = _run(model, inputs, cot)
    assert (native.calls, math.calls) == (BLOCKS, 0), "a patched block called diffusers' dispatch for 'native'"
    _compare(ours, ref)
    _compare(again, ref)


def test_processor_choice_wins_over_the_context_manager(spies):
    """As in diffusers' dispatch: a processor's own backend over the registry's active one."""
    import ditfast
    from diffusers.models.attention_dispatch import attention_backend

    model, inputs = _flux(), _inputs()
    ditfast.patch(model)
    model.transformer_blocks[0].attn.set_attention_backend("_native_math")
    math, native = spies("_native_math"), spies("native")
    with attention_backend("native"), torch.no_grad():
        model(**inputs, return_dict=False)
    assert (math.calls, native.calls) == (1, 0)


def test_backend_without_context_parallel_support_refuses():
    from diffusers.models.attention_dispatch import AttentionBackendName

    from ditfast.integrations._context_parallel import dispatch_attention

    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="does not support context parallelism"):
        dispatch_attention(q, q, q, backend=AttentionBackendName._NATIVE_MATH, config=object())
