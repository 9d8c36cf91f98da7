"""Plural: own your language model."""
__version__ = "0.1.0"
