"""The safety head: its maths, its GGUF file, and the base-model fingerprint that binds it to a model."""

from .core import LEXICAL, FeatureBlock, Head, ModelFingerprint, fingerprint_file, quantized
from .file import describe_head, load_head, save_head

__all__ = ["LEXICAL", "FeatureBlock", "describe_head", "Head", "ModelFingerprint", "fingerprint_file", "load_head", "quantized",
           "save_head"]
