class GGUFError(ValueError):
    """A GGUF file that cannot be used: unreadable, truncated, or holding an architecture, metadata
    field or tensor this package does not understand. The message names the file."""
