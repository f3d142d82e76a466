"""Built-in task distributions."""

from .sinusoid import SinusoidTasks

__all__ = ["SinusoidTasks"]
