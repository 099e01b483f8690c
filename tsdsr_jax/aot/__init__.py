"""Compiling the project's programs for a GPU from shapes alone, on any host (no GPU needed):
the cards (``cards``), the GPU compiler's plan of a program (``plan``), and the programs
themselves at any config and size (``programs``)."""
