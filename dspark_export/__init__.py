"""dspark-export: export, compile and profile DSpark speculative decoding."""

__version__ = "0.1.0"
