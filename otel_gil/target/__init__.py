"""Which ELF object holds CPython, which addresses to probe, which GIL layout:
read from files and from /proc, never by running the target's Python."""
