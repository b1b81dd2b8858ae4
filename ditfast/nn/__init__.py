"""ditfast.nn: drop-in DiT / SD3 / FLUX blocks with upstream parameter names, running on ditfast.ops."""
from .dit import DiTBlock, FinalLayer
from .flux import DoubleStreamBlock, LastLayer, SingleStreamBlock
from .sd3 import JointBlock

__all__ = ["DiTBlock", "FinalLayer", "DoubleStreamBlock", "SingleStreamBlock", "LastLayer", "JointBlock"]
