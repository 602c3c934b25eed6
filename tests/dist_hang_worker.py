"""A `multitag train` process for torchrun whose rank 1 hangs (sleeps) at the start of epoch 2.

tests/test_distributed.py runs it to check that rank 0 gives up after train.dist_timeout_s with a
one-line error instead of waiting forever (a hung process stays alive, so torchrun's agent alone
would never notice it).
"""
import os
import sys
import time

from multitag import engine
from multitag.cli import main

if os.environ.get("RANK") == "1":
    real = engine.train_one_epoch

    def hang_in_epoch_2(*args, **kwargs):
        if args[-1] == 1:              # the epoch index
            time.sleep(600)
        return real(*args, **kwargs)

    engine.train_one_epoch = hang_in_epoch_2

sys.exit(main(["train", *sys.argv[1:]]))
