"""Benchmarks of maddylite against its peers; run ``python -m bench [NAME...] [--quick]``."""
