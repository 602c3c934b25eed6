import torch

from multitag.config import AugConfig
from multitag.data.transforms import BatchAugment, normalize

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def batch(b=4, s=16):
    return torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_normalize_matches_formula():
    x = batch()
    y = normalize(x, MEAN, STD)
    assert y.dtype == torch.float32
    assert torch.allclose(y, (x.float() / 255 - 0.5) / 0.25)


def test_flip_only_is_exact_flip_or_identity():
    x = batch(8)
    aug = BatchAugment(AugConfig(hflip=True, scale=(1.0, 1.0)), MEAN, STD)
    y = aug(x, torch.Generator().manual_seed(3))
    plain, flipped = normalize(x, MEAN, STD), normalize(x.flip(3), MEAN, STD)
    per_image = [torch.equal(y[i], plain[i]) or torch.equal(y[i], flipped[i]) for i in range(8)]
    assert all(per_image)
    assert any(not torch.equal(y[i], plain[i]) for i in range(8))   # some were flipped


def test_full_augmentation_shapes_and_determinism():
    x = batch(6, 24)
    aug = BatchAugment(AugConfig(scale=(0.5, 1.0), rotate=15, color_jitter=0.3, erasing=0.5), MEAN, STD)
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    assert a.shape == (6, 3, 24, 24) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all()


def test_identity_crop_keeps_pixels():
    # scale (1, 1) with rotate>0 but angle range tiny resamples almost exactly the input
    x = batch(2, 16)
    aug = BatchAugment(AugConfig(hflip=False, scale=(0.999999, 1.0), ratio=(1.0, 1.0), rotate=1e-6), MEAN, STD)
    y = aug(x, torch.Generator().manual_seed(0))
    assert torch.allclose(y, normalize(x, MEAN, STD), atol=1e-3)
