"""mmkd: train compact cross-modal students from frozen image, text and audio teachers."""

__version__ = "0.1.0"
