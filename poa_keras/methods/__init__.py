"""Trainers (keras.Model subclasses used with compile()/fit()) and what they share: the
per-backend, per-plan train steps (base.py), the EMA teacher and its views
(teacher_student.py), the schedules (schedules.py), checkpoints (checkpoint.py) and the stop at
a non-finite loss (nan_guard.py). Methods: DINO, POA, SimSiam and SSQL (simsiam.py, ssql.py),
MAE with MAE-Lite's attention distillation (mae.py), TinyViT's soft-label distillation
(distill.py).
The recipe runner is ``poa_keras.pretrain``."""
from poa_keras.methods import schedules
from poa_keras.methods.base import PlannedTrainer
from poa_keras.methods.checkpoint import CheckpointManager, PretrainCheckpoint
from poa_keras.methods.dino import DINO, DINO_RECIPE
from poa_keras.methods.distill import DISTILL_RECIPE, SoftLabelDistillation
from poa_keras.methods.mae import MAE, MAE_RECIPE
from poa_keras.methods.nan_guard import NonFiniteLoss, StopOnNonFiniteLoss
from poa_keras.methods.poa import POA, POA_RECIPE
from poa_keras.methods.simsiam import SIMSIAM_RECIPE, SimSiam
from poa_keras.methods.ssql import SSQL, SSQL_RECIPE
from poa_keras.methods.teacher_student import TeacherStudentTrainer

__all__ = ["CheckpointManager", "DINO", "DINO_RECIPE", "DISTILL_RECIPE", "MAE", "MAE_RECIPE", "NonFiniteLoss",
           "POA", "POA_RECIPE", "PlannedTrainer", "PretrainCheckpoint", "SIMSIAM_RECIPE", "SSQL",
           "SSQL_RECIPE", "SimSiam", "SoftLabelDistillation", "StopOnNonFiniteLoss", "TeacherStudentTrainer",
           "schedules"]
