"""dmgan: DM-GAN (Dynamic Memory GAN for text-to-image synthesis) in modern PyTorch.

    from dmgan import TextToImage

    pipe = TextToImage.from_pretrained("runs/shapes/checkpoints/latest.pt")  # or a folder, or OWNER/NAME
    images = pipe("a large red circle", num_images=4, seed=0)

``TextToImage`` is imported on first use (PEP 562), so ``import dmgan`` stays light: it imports
neither torch nor any submodule (the version, the setup script and the command lines' ``--help``
read it cheaply).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["TextToImage", "__version__"]

if TYPE_CHECKING:
    from dmgan.pipeline import TextToImage


def __getattr__(name: str) -> Any:
    if name == "TextToImage":
        from dmgan.pipeline import TextToImage

        return TextToImage
    raise AttributeError(f"module 'dmgan' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "TextToImage"])
