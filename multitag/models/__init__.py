"""Models: a registry of families that all return logits and expose forward_features / forward_head."""
from multitag.models.registry import build_model, count_parameters, get_spec, model_names

__all__ = ["build_model", "count_parameters", "get_spec", "model_names"]
