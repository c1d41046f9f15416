"""Built-in mx_auth modules."""
