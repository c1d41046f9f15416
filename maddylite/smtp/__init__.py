"""Shared SMTP protocol pieces: reply codes, enhanced codes and the SMTP error value."""
