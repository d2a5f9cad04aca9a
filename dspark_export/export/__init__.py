"""Export: trace the pair into target/draft/markov/verify ONNX graphs (see docs/graphs.md)."""
from dspark_export.export.pipeline import ExportError, export_graphs

__all__ = ["ExportError", "export_graphs"]
