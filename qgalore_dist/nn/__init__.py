from .convert import DEFAULT_TARGET_MODULES, find_target_linears, quantize_model
from .int8_linear import QGaLoreLinear

__all__ = ["DEFAULT_TARGET_MODULES", "QGaLoreLinear", "find_target_linears", "quantize_model"]
