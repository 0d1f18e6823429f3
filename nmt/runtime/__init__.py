"""The torch-free ONNX Runtime translator: an exported directory (`nmt export`) decoded with
numpy, sentencepiece and onnxruntime by the search rules of `nmt.search`. Nothing here imports
torch."""

from nmt.runtime.files import ExportedModelError, is_exported_dir
from nmt.runtime.translator import OnnxTranslator, TranslationResult

__all__ = ["ExportedModelError", "OnnxTranslator", "TranslationResult", "is_exported_dir"]
