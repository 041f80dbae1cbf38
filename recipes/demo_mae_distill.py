"""The CPU demo of MAE-Lite's attention distillation (REFERENCE.md §3): recipes/demo_mae.py
(the same student, data and schedule) plus the MSE between the student's last-block attention
logits, mapped to the teacher's 8 heads by a learned 1 x 1 head mapping, and those of a frozen
wider MAE (recipes/demo_mae_teacher.py, trained first into <output>/distill_teacher when no
teacher preset is given) on the same visible tokens; weight 1.0 as MAE-Lite.

Use a trained teacher instead with ``--override=distill.teacher=PATH`` and
``--override=distill.teacher_recipe=None``.
"""
from poa_keras.pretrain import load_recipe

_DEMO = load_recipe("demo_mae")
_DEMO.pop("name", None)

RECIPE = dict(_DEMO, train=dict(_DEMO["train"], distill_weight=1.0, distill_blocks=[-1]),
              distill=dict(teacher_recipe="demo_mae_teacher"))
