"""ditfast.ops: the functional API (docs/design.md). Each op validates its inputs, then runs the
implementation that ditfast/_backend.py resolves (``backend=``, ditfast.use_backend, DITFAST_BACKEND
or the automatic choice)."""
from .modulate import gated_residual, gated_residual_norm_modulate, norm_modulate, norm_modulate_dual
from .rope import apply_rope, qk_norm_rope, rms_norm, rope_freqs
from .prepare import prepare_attention
from .gelu import gelu_tanh_backward
from .swiglu import swiglu
from .attention import backend_report, choose_backend, explain_choice, joint_attention, joint_attention_streams
from . import cuda_impl  # noqa: F401,E402  (the "cuda" backend: ditfast._C, loaded lazily; safe without it)

__all__ = [
    "norm_modulate",
    "norm_modulate_dual",
    "gated_residual",
    "gated_residual_norm_modulate",
    "rms_norm",
    "rope_freqs",
    "apply_rope",
    "qk_norm_rope",
    "prepare_attention",
    "gelu_tanh_backward",
    "swiglu",
    "joint_attention",
    "joint_attention_streams",
    "choose_backend",
    "explain_choice",
    "backend_report",
]
