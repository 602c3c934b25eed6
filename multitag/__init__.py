"""multitag: multi-label-first CNN image classification, from a folder or annotation file to a served model."""
__version__ = "0.1.0"
