"""Run under torchrun by test_train_loop: trains, then saves this rank's generator weights."""

import os
import sys

import torch

from dmgan.train import train_from_command_line
from dmgan.training_step import unwrap

if __name__ == "__main__":
    dump = sys.argv[1]
    _, gan = train_from_command_line(sys.argv[2:])
    params = dict(unwrap(gan.netG).named_parameters())
    torch.save({"params": params, "ema": gan.ema.params}, f"{dump}/rank{os.environ['RANK']}.pt")
