"""moedistill: knowledge distillation for compressed Mixture-of-Experts LLMs."""

from moedistill.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
