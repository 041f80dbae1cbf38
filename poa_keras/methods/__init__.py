"""Trainers (keras.Model subclasses used with compile()/fit()) and what they share: the
per-backend, per-plan train steps (base.py) and the schedules (schedules.py)."""
from poa_keras.methods import schedules
from poa_keras.methods.base import PlannedTrainer
from poa_keras.methods.dino import DINO, DINO_RECIPE, TeacherStudentTrainer
from poa_keras.methods.poa import POA, POA_RECIPE

__all__ = ["DINO", "DINO_RECIPE", "POA", "POA_RECIPE", "PlannedTrainer", "TeacherStudentTrainer",
           "schedules"]
