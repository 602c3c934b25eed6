"""Checks several model tests make."""
import torch


def assert_training_sees_one_view(plain: torch.nn.Module, with_views: torch.nn.Module, x: torch.Tensor) -> None:
    """In training mode a model with test-time views computes what the plain one does (same seed for dropout)."""
    plain.train(), with_views.train()
    torch.manual_seed(1)
    want = plain(x)
    torch.manual_seed(1)
    assert torch.equal(with_views(x), want)
