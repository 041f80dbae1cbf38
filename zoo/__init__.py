"""Preset cards (JSON), shipped as the package data of ``poa_keras.zoo``."""
