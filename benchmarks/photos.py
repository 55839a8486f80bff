"""An ImageNet-like folder made from real photographs: scikit-learn's and scikit-image's sample photos, cut and
rescaled to ImageNet's typical sizes (a shorter side of 333-500 px, aspect ratios 3/4-4/3) and saved as JPEG at
quality 90. One class per source photo; the files differ in what part of their photo they show and at what scale.
"""

from pathlib import Path

import numpy as np
from PIL import Image

# scikit-image's colour photographs (its other sample images are gray, synthetic or need extra downloads)
SKIMAGE_PHOTOS = ("astronaut", "cat", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina")


def sample_photos() -> dict[str, Image.Image]:
    """{name: RGB photograph}: scikit-learn's two sample images and scikit-image's colour photographs."""
    from sklearn.datasets import load_sample_images

    photos = {f"sklearn-{i}": Image.fromarray(a) for i, a in enumerate(load_sample_images().images)}
    try:
        import skimage.data
    except ImportError:  # scikit-learn's two suffice for small folders
        return photos
    return photos | {name: Image.fromarray(getattr(skimage.data, name)()) for name in SKIMAGE_PHOTOS}


def write_photo_folder(root: str | Path, count: int, split: str = "train", seed: int = 0,
                       photos: dict[str, Image.Image] | None = None) -> Path:
    """`count` JPEGs in root/split/<photo>/NNNNNN.jpg; returns root."""
    photos = photos or sample_photos()
    names = sorted(photos)
    rng = np.random.default_rng(seed)
    for i in range(count):
        name = names[i % len(names)]
        photo = photos[name]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.4, 1.0)), int(h * rng.uniform(0.4, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        shorter = int(rng.integers(333, 501))
        aspect = rng.uniform(3 / 4, 4 / 3)
        size = (shorter, int(shorter * aspect)) if aspect > 1 else (int(shorter / aspect), shorter)
        folder = Path(root, split, name)
        folder.mkdir(parents=True, exist_ok=True)
        photo.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BICUBIC).save(folder / f"{i:06d}.jpg",
                                                                                      quality=90)
    return Path(root)
