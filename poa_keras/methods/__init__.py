"""Trainers (keras.Model subclasses used with compile()/fit()) and what they share: the
per-backend, per-plan train steps (base.py) and the schedules (schedules.py)."""
from poa_keras.methods import schedules
from poa_keras.methods.base import PlannedTrainer

__all__ = ["PlannedTrainer", "schedules"]
