"""maddylite: a secure outbound mail server configured in maddy's language."""

__version__ = "0.1.0"
