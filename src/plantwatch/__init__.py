"""plantwatch: industrial IoT monitoring and predictive maintenance."""

__version__ = "0.1.0"
