"""Framework-free core of the AlexNet every backend builds: the spec and everything computed from it."""
from pathlib import Path

from .spec import ModelSpec, SpecError, book_alexnet, get_spec, paper_alexnet

__version__ = "0.1.0"
# The repository (or install) root: subprocesses get it on PYTHONPATH.
ROOT = Path(__file__).resolve().parents[1]
__all__ = ["ModelSpec", "SpecError", "book_alexnet", "get_spec", "paper_alexnet", "ROOT", "__version__"]
