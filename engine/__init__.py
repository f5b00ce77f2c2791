"""supermerge: learned, memory-bounded merging of many fine-tuned experts into one model."""

__version__ = "0.1.0"
