"""Transfer: export a pretrained backbone for other libraries, and fine-tune it for detection and segmentation."""

from .export import FORMATS, Export, ExportCheckError, export_encoder

__all__ = ["FORMATS", "Export", "ExportCheckError", "export_encoder"]
