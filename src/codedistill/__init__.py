"""codedistill: make small code models better with large ones, using execution feedback."""

__version__ = "0.1.0"
