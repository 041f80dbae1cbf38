"""Trainers (keras.Model subclasses used with compile()/fit()) and what they share: the
per-backend, per-plan train steps (base.py), the schedules (schedules.py), checkpoints
(checkpoint.py) and the recipe runner (pretrain.py)."""
from poa_keras.methods import schedules
from poa_keras.methods.base import PlannedTrainer
from poa_keras.methods.dino import DINO, DINO_RECIPE, TeacherStudentTrainer
from poa_keras.methods.checkpoint import CheckpointManager, NonFiniteLoss
from poa_keras.methods.poa import POA, POA_RECIPE
from poa_keras.methods.pretrain import load_recipe, pretrain, recipe_names

__all__ = ["CheckpointManager", "DINO", "DINO_RECIPE", "NonFiniteLoss", "POA", "POA_RECIPE",
           "PlannedTrainer", "TeacherStudentTrainer", "load_recipe", "pretrain", "recipe_names",
           "schedules"]
