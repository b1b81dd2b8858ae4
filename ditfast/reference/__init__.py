"""ditfast.reference: the plain-PyTorch definition of every op, the ground truth for the tests."""
from .attention import joint_attention
from .gelu import gelu_tanh_backward
from .swiglu import swiglu
from .prepare import prepare_attention
from .modulate import gated_residual, gated_residual_norm_modulate, norm_modulate, norm_modulate_dual
from .rope import apply_rope, qk_norm_rope, rms_norm, rope_freqs

__all__ = [
    "norm_modulate",
    "norm_modulate_dual",
    "gated_residual",
    "gated_residual_norm_modulate",
    "rms_norm",
    "rope_freqs",
    "apply_rope",
    "qk_norm_rope",
    "joint_attention",
    "prepare_attention",
    "gelu_tanh_backward",
    "swiglu",
]
