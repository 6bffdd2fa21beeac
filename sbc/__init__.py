"""Session Border Controller."""

__version__ = "0.1.0"
