"""The package version, in a module of its own: presets, sweeps and the CLI record it without
importing the package root (which imports every family)."""
__version__ = "0.1.0"
