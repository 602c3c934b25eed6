"""Data: readers into one LabelTable, splitting, the decode-once cache, batching and augmentation."""
from multitag.data.table import LabelTable

__all__ = ["LabelTable"]
