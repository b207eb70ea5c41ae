"""dmgan: DM-GAN (Dynamic Memory GAN for text-to-image synthesis) in modern PyTorch."""

__version__ = "0.1.0"
