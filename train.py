"""Train DM-GAN: ``python train.py --help``. All the work is in :mod:`dmgan.train`."""

from dmgan.train import main

if __name__ == "__main__":
    main()
