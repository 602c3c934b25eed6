"""multitag: multi-label-first CNN image classification, from a folder or annotation file to a served model.

    import multitag
    run = multitag.train("demo", data="labels.csv")
    model = multitag.load(run)
    model.predict(["image.jpg"])
"""
__version__ = "0.1.0"

_API = {"train": "multitag.api", "evaluate": "multitag.api", "calibrate": "multitag.api", "demo": "multitag.api",
        "lr_find": "multitag.api", "inspect_data": "multitag.api", "load": "multitag.predict"}


def __getattr__(name: str):
    # Imported on first use so `import multitag` (and `multitag --help`) stays fast: torch loads lazily.
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'multitag' has no attribute {name!r}")


__all__ = ["train", "load", "evaluate", "calibrate", "lr_find", "inspect_data", "demo", "__version__"]
