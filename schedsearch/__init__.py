"""schedsearch: search few-step sampling schedules for diffusion models without retraining."""

__version__ = "0.1.0"
