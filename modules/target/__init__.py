"""Built-in target modules."""
