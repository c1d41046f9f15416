"""Built-in endpoint modules."""
