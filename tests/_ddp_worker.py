"""Run under torchrun by test_train_loop: trains, then saves this rank's generator weights.
With DMGAN_TEST_EVALUATION_SECONDS set, an evaluation while training (rank 0's alone) takes that
long and returns made-up scores."""

import os
import sys
import time

import torch

import dmgan.trainer
from dmgan.train import train_from_command_line
from dmgan.training_step import unwrap


def slow_evaluation(*_args, **_kwargs):
    time.sleep(float(os.environ["DMGAN_TEST_EVALUATION_SECONDS"]))
    return {"fid": 1.0, "kid": 0.0}


if __name__ == "__main__":
    if "DMGAN_TEST_EVALUATION_SECONDS" in os.environ:
        dmgan.trainer.evaluate_while_training = slow_evaluation
    dump = sys.argv[1]
    _, gan = train_from_command_line(sys.argv[2:])
    params = dict(unwrap(gan.netG).named_parameters())
    torch.save({"params": params, "ema": gan.ema.params}, f"{dump}/rank{os.environ['RANK']}.pt")
