"""chatd: a small self-hosted chat server speaking length-prefixed msgpack over TCP."""

__version__ = "0.1.0"

__all__ = ["__version__"]
