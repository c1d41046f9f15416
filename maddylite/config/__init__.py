"""Configuration: the maddy language parser, config nodes, typed directives and errors."""
