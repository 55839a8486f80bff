"""Transfer a pretrained encoder to other libraries: `export_encoder` writes its backbone for torchvision, timm,
Detectron2 or as safetensors; `read_safetensors` rebuilds the backbone from a safetensors export."""

from .export import FORMATS, Export, ExportCheckError, export_encoder, read_safetensors

__all__ = ["FORMATS", "Export", "ExportCheckError", "export_encoder", "read_safetensors"]
