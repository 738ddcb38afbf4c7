"""EXL2 conversion (survey §5): measure per-layer quantization error, choose per-layer settings for a target
bpw, quantize with GPTQ on the calibration activations, and write the model folder."""

from .converter import ConversionInterrupted, ConvertSettings, Converter, convert_exl2
from .qparams import CANDIDATES, QuantOption, head_option

__all__ = ["ConvertSettings", "Converter", "ConversionInterrupted", "convert_exl2", "QuantOption", "CANDIDATES",
           "head_option"]
