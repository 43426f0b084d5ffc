"""Framework-free core of the three-framework AlexNet: the spec and everything computed from it."""
from .spec import ModelSpec, SpecError, book_alexnet, get_spec, paper_alexnet

__version__ = "0.1.0"
__all__ = ["ModelSpec", "SpecError", "book_alexnet", "get_spec", "paper_alexnet", "__version__"]
