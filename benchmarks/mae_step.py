"""What an MAE step costs, per backend, next to a POA step and with MAE-Lite's distillation.

    KERAS_BACKEND=torch python benchmarks/mae_step.py [--steps=12 --batch=64]

Two pairs built from the demo recipes (batch ``--batch`` images), each timed in alternation
after one warm-up step per arm (``ssql_step.pair``: medians, their ratio, images/s and the
compilations):

* ``demo_mae`` / ``demo``: an MAE step of ``vit_mae_demo`` (32 px, 16 of 64 patches visible,
  decoder width 32) vs a POA step of the demo teacher ``vit_elastic_demo`` (2 global 32 px + 2
  local 16 px crops, teacher, intact and elastic students; pinned to the middle subnet);
* ``demo_mae_distill`` / ``demo_mae``: the same MAE step plus the frozen teacher's forward
  (``vit_mae_demo_wide``, random weights: the timing does not depend on them) and the
  attention distillation term.
"""
from __future__ import annotations

import os
import sys

from absl import app

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ssql_step  # noqa: E402  (its flags: --steps, --batch)


def main(argv):
    del argv
    flags = ssql_step.FLAGS
    ssql_step.pair("demo_mae", "demo", flags.steps, flags.batch)
    ssql_step.pair("demo_mae_distill", "demo_mae", flags.steps, flags.batch)


if __name__ == "__main__":
    app.run(main)
