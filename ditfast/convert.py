"""State-dict converters between the original checkpoint names and diffusers' names.

ditfast's blocks and models use the *original* parameter names (black-forest-labs/flux for FLUX.1,
Stability-AI/sd3.5 ``mmditx.py`` for SD3 / SD3.5, facebookresearch/DiT for DiT), so an original
checkpoint loads into them unchanged. These functions translate to and from the names of diffusers'
``FluxTransformer2DModel``, ``SD3Transformer2DModel`` and ``DiTTransformer2DModel`` (and their blocks).

What changes besides the names (docs/upstream.md, "Checkpoint key names"):

- fused projections are split along the output dim: ``qkv`` -> ``to_q`` / ``to_k`` / ``to_v``
  (each part head-major), FLUX single-stream ``linear1`` -> ``attn.to_{q,k,v}`` + ``proj_mlp``;
  the reverse direction concatenates them again;
- diffusers' ``AdaLayerNormContinuous`` (``norm_out``, and the pre-only last SD3 block's
  ``norm1_context``) splits its Linear's output as (scale, shift) where the originals use
  (shift, scale): the two halves of the weight rows and of the bias are swapped.

Every function is pure (state_dict in, new dict out; the input is not modified) and the round trip
is exact: ``diffusers_to_flux(flux_to_diffusers(sd))`` has the same keys and bitwise-equal tensors
(likewise for SD3; for DiT, whose ``pos_embed`` diffusers does not save, pass ``input_size``).
Output tensors may be views of the input tensors (no copies are made). Keys that a converter does
not know raise a ``KeyError`` naming them, so nothing is dropped silently.

Block-level helpers take the state dict of *one* block, keys without the block prefix
(``block.state_dict()``), and return the other naming, also without prefix.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = [
    # whole models
    "flux_to_diffusers",
    "diffusers_to_flux",
    "sd3_to_diffusers",
    "diffusers_to_sd3",
    "dit_to_diffusers",
    "diffusers_to_dit",
    # blocks
    "flux_double_block_to_diffusers",
    "diffusers_to_flux_double_block",
    "flux_single_block_to_diffusers",
    "diffusers_to_flux_single_block",
    "sd3_joint_block_to_diffusers",
    "diffusers_to_sd3_joint_block",
    "dit_block_to_diffusers",
    "diffusers_to_dit_block",
    "flux_last_layer_to_diffusers",
    "diffusers_to_flux_last_layer",
    # small helpers
    "swap_shift_scale",
]

StateDict = Dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Tensor transforms
# ----------------------------------------------------------------------------------------------
def swap_shift_scale(t: torch.Tensor) -> torch.Tensor:
    """Swap the two halves of dim 0: (shift, scale) rows <-> (scale, shift) rows. Its own inverse."""
    if t.shape[0] % 2:
        raise ValueError(f"cannot swap the halves of a tensor with an odd first dim {tuple(t.shape)}")
    a, b = t.chunk(2, dim=0)
    return torch.cat((b, a), dim=0)


# A rule maps one original module (or parameter) to one or more diffusers modules:
#   kind "rename": one to one;  "swap": one to one with swap_shift_scale;
#   "split": original = cat(diffusers parts, dim 0); part sizes from ``sizes()`` (None: equal parts).
# ``params`` pairs the parameter names on both sides (FLUX's QK-norm "scale" is diffusers' "weight").
_WB = (("weight", "weight"), ("bias", "bias"))


class _Rule:
    __slots__ = ("orig", "diff", "kind", "params", "sizes")

    def __init__(self, orig: str, diff, kind: str = "rename", params=_WB, sizes=None):
        self.orig = orig
        self.diff: Tuple[str, ...] = (diff,) if isinstance(diff, str) else tuple(diff)
        self.kind = kind
        self.params = params
        self.sizes: Optional[Callable[[], List[int]]] = sizes


def _join(prefix: str, name: str) -> str:
    if not name:  # a rule on a bare parameter (e.g. SD3's top-level ``pos_embed``)
        return prefix
    return f"{prefix}.{name}" if prefix else name


def _apply_forward(sd: Mapping[str, torch.Tensor], rules: Sequence[_Rule]) -> Tuple[StateDict, set]:
    """original -> diffusers for the keys the rules cover; returns (converted, used original keys)."""
    out: StateDict = {}
    used = set()
    for r in rules:
        for p_orig, p_diff in r.params:
            key = _join(r.orig, p_orig)
            if key not in sd:
                continue
            t = sd[key]
            used.add(key)
            if r.kind == "rename":
                parts = [t]
            elif r.kind == "swap":
                parts = [swap_shift_scale(t)]
            elif r.kind == "split":
                if r.sizes is None:
                    if t.shape[0] % len(r.diff):
                        raise ValueError(f"{key}: dim 0 of {tuple(t.shape)} is not divisible by {len(r.diff)}")
                    parts = list(t.chunk(len(r.diff), dim=0))
                else:
                    sizes = r.sizes()
                    if sum(sizes) != t.shape[0]:
                        raise ValueError(f"{key}: dim 0 is {t.shape[0]}, expected {' + '.join(map(str, sizes))}")
                    parts = list(t.split(sizes, dim=0))
            else:  # pragma: no cover - rules are static
                raise AssertionError(r.kind)
            for name, part in zip(r.diff, parts):
                out[_join(name, p_diff)] = part
    return out, used


def _apply_backward(sd: Mapping[str, torch.Tensor], rules: Sequence[_Rule]) -> Tuple[StateDict, set]:
    """diffusers -> original for the keys the rules cover; returns (converted, used diffusers keys)."""
    out: StateDict = {}
    used = set()
    for r in rules:
        for p_orig, p_diff in r.params:
            keys = [_join(name, p_diff) for name in r.diff]
            present = [k in sd for k in keys]
            if not any(present):
                continue
            if not all(present):
                missing = [k for k, ok in zip(keys, present) if not ok]
                raise KeyError(f"incomplete split projection: have {[k for k in keys if k in sd]}, missing {missing}")
            used.update(keys)
            if r.kind == "rename":
                t = sd[keys[0]]
            elif r.kind == "swap":
                t = swap_shift_scale(sd[keys[0]])
            else:
                t = torch.cat([sd[k] for k in keys], dim=0)
            out[_join(r.orig, p_orig)] = t
    return out, used


def _check_all_used(sd: Mapping[str, torch.Tensor], used: Iterable[str], what: str) -> None:
    left = sorted(set(sd) - set(used))
    if left:
        shown = ", ".join(left[:8]) + (f", ... ({len(left)} in all)" if len(left) > 8 else "")
        raise KeyError(f"{what}: keys not recognised: {shown}")


def _convert(sd: Mapping[str, torch.Tensor], rules: Sequence[_Rule], forward: bool, what: str) -> StateDict:
    out, used = _apply_forward(sd, rules) if forward else _apply_backward(sd, rules)
    _check_all_used(sd, used, what)
    return out


def _group(
    sd: Mapping[str, torch.Tensor], prefixes: Sequence[str]
) -> Tuple[Dict[Tuple[str, int], StateDict], StateDict]:
    """Split keys ``{prefix}.{i}.{rest}`` into per-block dicts; returns (blocks, the other keys)."""
    blocks: Dict[Tuple[str, int], StateDict] = {}
    rest: StateDict = {}
    for k, t in sd.items():
        for p in prefixes:
            if k.startswith(p + "."):
                idx, _, tail = k[len(p) + 1:].partition(".")
                if idx.isdigit() and tail:
                    blocks.setdefault((p, int(idx)), {})[tail] = t
                    break
        else:
            rest[k] = t
    return blocks, rest


def _prefixed(prefix: str, sd: Mapping[str, torch.Tensor]) -> StateDict:
    return {f"{prefix}.{k}": t for k, t in sd.items()}


# ----------------------------------------------------------------------------------------------
# FLUX.1
# ----------------------------------------------------------------------------------------------
_QK = (("scale", "weight"),)

_FLUX_DOUBLE = [
    _Rule("img_mod.lin", "norm1.linear"),
    _Rule("txt_mod.lin", "norm1_context.linear"),
    _Rule("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), "split"),
    _Rule("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "split"),
    _Rule("img_attn.norm.query_norm", "attn.norm_q", params=_QK),
    _Rule("img_attn.norm.key_norm", "attn.norm_k", params=_QK),
    _Rule("txt_attn.norm.query_norm", "attn.norm_added_q", params=_QK),
    _Rule("txt_attn.norm.key_norm", "attn.norm_added_k", params=_QK),
    _Rule("img_attn.proj", "attn.to_out.0"),
    _Rule("txt_attn.proj", "attn.to_add_out"),
    _Rule("img_mlp.0", "ff.net.0.proj"),
    _Rule("img_mlp.2", "ff.net.2"),
    _Rule("txt_mlp.0", "ff_context.net.0.proj"),
    _Rule("txt_mlp.2", "ff_context.net.2"),
]


def _single_rules(hidden: int, total: int) -> List[_Rule]:
    """Rules for a FLUX single block whose ``linear1`` maps D = ``hidden`` to ``total`` = 3D + MLP rows."""
    return [
        _Rule("modulation.lin", "norm.linear"),
        # linear1 rows are [q | k | v | mlp_in] with q, k, v of D rows each
        _Rule("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "split",
              sizes=lambda: [hidden, hidden, hidden, total - 3 * hidden]),
        _Rule("linear2", "proj_out"),
        _Rule("norm.query_norm", "attn.norm_q", params=_QK),
        _Rule("norm.key_norm", "attn.norm_k", params=_QK),
    ]


_FLUX_LAST = [
    _Rule("adaLN_modulation.1", "norm_out.linear", "swap"),
    _Rule("linear", "proj_out"),
]

_FLUX_TOP = [
    _Rule("img_in", "x_embedder"),
    _Rule("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    _Rule("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    _Rule("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    _Rule("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    _Rule("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    _Rule("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    _Rule("txt_in", "context_embedder"),
    _Rule("final_layer.adaLN_modulation.1", "norm_out.linear", "swap"),
    _Rule("final_layer.linear", "proj_out"),
]


def flux_double_block_to_diffusers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """FLUX ``DoubleStreamBlock`` keys -> diffusers ``FluxTransformerBlock`` keys."""
    return _convert(sd, _FLUX_DOUBLE, True, "FLUX double block")


def diffusers_to_flux_double_block(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """diffusers ``FluxTransformerBlock`` keys -> FLUX ``DoubleStreamBlock`` keys."""
    return _convert(sd, _FLUX_DOUBLE, False, "diffusers FluxTransformerBlock")


def flux_single_block_to_diffusers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """FLUX ``SingleStreamBlock`` keys -> diffusers ``FluxSingleTransformerBlock`` keys.

    ``linear1`` (rows [q | k | v | mlp_in]) becomes ``attn.to_q/k/v`` (D rows each) and ``proj_mlp``.
    """
    if "linear1.weight" not in sd:
        raise KeyError("FLUX single block: 'linear1.weight' is needed to know the hidden size")
    hidden, total = sd["linear1.weight"].shape[1], sd["linear1.weight"].shape[0]
    return _convert(sd, _single_rules(hidden, total), True, "FLUX single block")


def diffusers_to_flux_single_block(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """diffusers ``FluxSingleTransformerBlock`` keys -> FLUX ``SingleStreamBlock`` keys."""
    return _convert(sd, _single_rules(0, 0), False, "diffusers FluxSingleTransformerBlock")


def flux_last_layer_to_diffusers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """FLUX ``LastLayer`` keys -> diffusers ``norm_out.linear`` (shift/scale swapped) and ``proj_out``."""
    return _convert(sd, _FLUX_LAST, True, "FLUX last layer")


def diffusers_to_flux_last_layer(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """diffusers ``norm_out.linear`` / ``proj_out`` -> FLUX ``LastLayer`` keys (shift/scale swapped back)."""
    return _convert(sd, _FLUX_LAST, False, "diffusers FLUX norm_out / proj_out")


def flux_to_diffusers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """A FLUX.1 checkpoint (black-forest-labs names) -> ``FluxTransformer2DModel`` state dict."""
    blocks, rest = _group(sd, ("double_blocks", "single_blocks"))
    out = _convert(rest, _FLUX_TOP, True, "FLUX model")
    for (p, i), bsd in sorted(blocks.items()):
        if p == "double_blocks":
            out.update(_prefixed(f"transformer_blocks.{i}", flux_double_block_to_diffusers(bsd)))
        else:
            out.update(_prefixed(f"single_transformer_blocks.{i}", flux_single_block_to_diffusers(bsd)))
    return out


def diffusers_to_flux(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """A ``FluxTransformer2DModel`` state dict -> FLUX.1 (black-forest-labs) names."""
    blocks, rest = _group(sd, ("transformer_blocks", "single_transformer_blocks"))
    out = _convert(rest, _FLUX_TOP, False, "diffusers FluxTransformer2DModel")
    for (p, i), bsd in sorted(blocks.items()):
        if p == "transformer_blocks":
            out.update(_prefixed(f"double_blocks.{i}", diffusers_to_flux_double_block(bsd)))
        else:
            out.update(_prefixed(f"single_blocks.{i}", diffusers_to_flux_single_block(bsd)))
    return out


# ----------------------------------------------------------------------------------------------
# SD3 / SD3.5 (MM-DiT)
# ----------------------------------------------------------------------------------------------
def _sd3_block_rules(pre_only: bool) -> List[_Rule]:
    rules = [
        _Rule("x_block.adaLN_modulation.1", "norm1.linear"),
        # the pre-only context stream uses diffusers' AdaLayerNormContinuous: (scale, shift) order
        _Rule("context_block.adaLN_modulation.1", "norm1_context.linear", "swap" if pre_only else "rename"),
        _Rule("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), "split"),
        _Rule("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "split"),
        # QK-norm: "rms" has a weight; "ln" (LayerNorm) weight and bias; both pass through _WB.
        _Rule("x_block.attn.ln_q", "attn.norm_q"),
        _Rule("x_block.attn.ln_k", "attn.norm_k"),
        _Rule("context_block.attn.ln_q", "attn.norm_added_q"),
        _Rule("context_block.attn.ln_k", "attn.norm_added_k"),
        _Rule("x_block.attn.proj", "attn.to_out.0"),
        _Rule("context_block.attn.proj", "attn.to_add_out"),
        _Rule("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v"), "split"),
        _Rule("x_block.attn2.ln_q", "attn2.norm_q"),
        _Rule("x_block.attn2.ln_k", "attn2.norm_k"),
        _Rule("x_block.attn2.proj", "attn2.to_out.0"),
        _Rule("x_block.mlp.fc1", "ff.net.0.proj"),
        _Rule("x_block.mlp.fc2", "ff.net.2"),
        _Rule("context_block.mlp.fc1", "ff_context.net.0.proj"),
        _Rule("context_block.mlp.fc2", "ff_context.net.2"),
    ]
    return rules


def sd3_joint_block_to_diffusers(sd: Mapping[str, torch.Tensor], *, pre_only: Optional[bool] = None) -> StateDict:
    """SD3.5 ``JointBlock`` keys -> diffusers ``JointTransformerBlock`` keys.

    ``pre_only`` (the last block) is detected from the absence of ``context_block.attn.proj.weight``
    unless given; it decides whether ``norm1_context`` gets the shift/scale swap.
    """
    if pre_only is None:
        pre_only = "context_block.attn.proj.weight" not in sd
    return _convert(sd, _sd3_block_rules(pre_only), True, "SD3 joint block")


def diffusers_to_sd3_joint_block(sd: Mapping[str, torch.Tensor], *, pre_only: Optional[bool] = None) -> StateDict:
    """diffusers ``JointTransformerBlock`` keys -> SD3.5 ``JointBlock`` keys.

    ``pre_only`` (``context_pre_only``) is detected from the absence of ``attn.to_add_out.weight``.
    """
    if pre_only is None:
        pre_only = "attn.to_add_out.weight" not in sd
    return _convert(sd, _sd3_block_rules(pre_only), False, "diffusers JointTransformerBlock")


_SD3_TOP = [
    _Rule("x_embedder.proj", "pos_embed.proj"),
    _Rule("pos_embed", "pos_embed.pos_embed", params=(("", ""),)),
    _Rule("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    _Rule("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    _Rule("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    _Rule("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    _Rule("context_embedder", "context_embedder"),
    _Rule("final_layer.adaLN_modulation.1", "norm_out.linear", "swap"),
    _Rule("final_layer.linear", "proj_out"),
]

_SD3_PREFIX = "model.diffusion_model."  # prefix of the official single-file SD3 / SD3.5 checkpoints


def sd3_to_diffusers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """An SD3 / SD3.5 MM-DiT checkpoint (``mmditx.py`` names) -> ``SD3Transformer2DModel`` state dict.

    A leading ``model.diffusion_model.`` (single-file checkpoints) is stripped; other keys of such a
    file (VAE, text encoders) must be removed by the caller.
    """
    sd = {(k[len(_SD3_PREFIX):] if k.startswith(_SD3_PREFIX) else k): t for k, t in sd.items()}
    blocks, rest = _group(sd, ("joint_blocks",))
    out = _convert(rest, _SD3_TOP, True, "SD3 model")
    for (_, i), bsd in sorted(blocks.items()):
        out.update(_prefixed(f"transformer_blocks.{i}", sd3_joint_block_to_diffusers(bsd)))
    return out


def diffusers_to_sd3(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """An ``SD3Transformer2DModel`` state dict -> SD3.5 ``mmditx.py`` names (no ``model.diffusion_model.``)."""
    blocks, rest = _group(sd, ("transformer_blocks",))
    out = _convert(rest, _SD3_TOP, False, "diffusers SD3Transformer2DModel")
    for (_, i), bsd in sorted(blocks.items()):
        out.update(_prefixed(f"joint_blocks.{i}", diffusers_to_sd3_joint_block(bsd)))
    return out


# ----------------------------------------------------------------------------------------------
# DiT (facebookresearch/DiT) <-> diffusers DiTTransformer2DModel
# ----------------------------------------------------------------------------------------------
_DIT_BLOCK = [
    _Rule("adaLN_modulation.1", "norm1.linear"),
    _Rule("attn.qkv", ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "split"),
    _Rule("attn.proj", "attn1.to_out.0"),
    _Rule("mlp.fc1", "ff.net.0.proj"),
    _Rule("mlp.fc2", "ff.net.2"),
]
# diffusers' DiT final layer (proj_out_1) chunks (shift, scale) like the original: no swap.
_DIT_TOP = [
    _Rule("x_embedder.proj", "pos_embed.proj"),
    _Rule("final_layer.adaLN_modulation.1", "proj_out_1"),
    _Rule("final_layer.linear", "proj_out_2"),
]
_DIT_EMB = [  # original top-level embedders <-> every diffusers block's norm1.emb
    _Rule("t_embedder.mlp.0", "timestep_embedder.linear_1"),
    _Rule("t_embedder.mlp.2", "timestep_embedder.linear_2"),
    _Rule("y_embedder.embedding_table", "class_embedder.embedding_table"),
]


def dit_block_to_diffusers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """DiT ``DiTBlock`` keys -> diffusers ``BasicTransformerBlock`` (ada_norm_zero) keys, minus ``norm1.emb``."""
    return _convert(sd, _DIT_BLOCK, True, "DiT block")


def diffusers_to_dit_block(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """diffusers ``BasicTransformerBlock`` (ada_norm_zero) keys -> DiT ``DiTBlock`` keys.

    ``norm1.emb.*`` (diffusers' per-block copy of the timestep / label embedder) must be removed first;
    :func:`diffusers_to_dit` does that.
    """
    return _convert(sd, _DIT_BLOCK, False, "diffusers BasicTransformerBlock")


def dit_to_diffusers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """A DiT checkpoint -> ``DiTTransformer2DModel`` state dict.

    diffusers keeps a copy of the timestep and label embedders in every block (``norm1.emb``); the
    shared ``t_embedder`` / ``y_embedder`` are copied (as views) into each. ``pos_embed`` is dropped:
    diffusers recomputes it as a non-persistent buffer. Numerics differ in two places that are not
    weights (so not this module's business, but worth knowing): diffusers' DiT timestep embedding uses
    ``downscale_freq_shift=1`` (frequencies ``exp(-ln(1e4)·j/(half-1))``; the original divides by
    ``half``), and its MLP LayerNorm uses the ``norm_eps`` config (default 1e-5; the original 1e-6).
    """
    blocks, rest = _group(sd, ("blocks",))
    rest = dict(rest)
    rest.pop("pos_embed", None)
    emb_src = {k: rest.pop(k) for k in list(rest) if k.startswith(("t_embedder.", "y_embedder."))}
    out = _convert(rest, _DIT_TOP, True, "DiT model")
    emb = _convert(emb_src, _DIT_EMB, True, "DiT embedders")
    for (_, i), bsd in sorted(blocks.items()):
        out.update(_prefixed(f"transformer_blocks.{i}", dit_block_to_diffusers(bsd)))
        out.update(_prefixed(f"transformer_blocks.{i}.norm1.emb", emb))
    return out


def diffusers_to_dit(sd: Mapping[str, torch.Tensor], *, input_size: Optional[int] = None) -> StateDict:
    """A ``DiTTransformer2DModel`` state dict -> DiT names.

    The embedders are taken from block 0's ``norm1.emb`` (diffusers' converter writes the same
    weights into every block; a ``ValueError`` is raised if they differ). diffusers does not save
    ``pos_embed``; pass ``input_size`` (the latent side, DiT's ``input_size``) to have the fixed 2-D
    sin-cos table computed (patch size read from ``pos_embed.proj.weight``).
    """
    blocks, rest = _group(sd, ("transformer_blocks",))
    out = _convert(rest, _DIT_TOP, False, "diffusers DiTTransformer2DModel")
    emb0: Optional[StateDict] = None
    for (_, i), bsd in sorted(blocks.items()):
        emb = {k[len("norm1.emb."):]: t for k, t in bsd.items() if k.startswith("norm1.emb.")}
        core = {k: t for k, t in bsd.items() if not k.startswith("norm1.emb.")}
        if emb0 is None:
            emb0 = emb
        elif emb.keys() != emb0.keys() or any(
            not (emb[k].is_meta or torch.equal(emb[k], emb0[k])) for k in emb
        ):
            raise ValueError(f"transformer_blocks.{i}.norm1.emb differs from block 0's; the original DiT shares one")
        out.update(_prefixed(f"blocks.{i}", diffusers_to_dit_block(core)))
    if emb0:
        out.update(_convert(emb0, _DIT_EMB, False, "diffusers DiT norm1.emb"))
    if input_size is not None:
        w = out["x_embedder.proj.weight"]
        grid = input_size // w.shape[-1]
        from .nn.models.dit import sincos_pos_embed_2d  # the nn layer, only when asked for

        out["pos_embed"] = sincos_pos_embed_2d(w.shape[0], grid).unsqueeze(0).to(w.dtype)
    return out
