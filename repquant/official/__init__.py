"""Official meituan/YOLOv6 checkpoints: a safe reader (``reader``) and the mapping of their module tree onto
repquant's models (``mapping``)."""

from repquant.official.mapping import ConvertedModel, MappingReport, convert_official, load_official_model
from repquant.official.reader import OfficialFile, read_official

__all__ = ["ConvertedModel", "MappingReport", "OfficialFile", "convert_official", "load_official_model",
           "read_official"]
