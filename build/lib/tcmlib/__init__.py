"""tcmlib: threshold-consistent deep metric learning.

The TCM loss (``tcmlib.losses``), OPIS / eps-OPIS / Recall@k / MAP@R (``tcmlib.metrics``),
ranking base losses, data, models and a resumable training loop.  Every function takes
PyTorch tensors (or NumPy arrays), runs on CPU or GPU and documents its shapes.
"""

from tcmlib.runtime import default_device, is_smoke, scale, seed_everything, smoke_note, smoke_tag

__version__ = "0.1.0"
__all__ = ["__version__", "default_device", "is_smoke", "scale", "seed_everything", "smoke_note", "smoke_tag"]
