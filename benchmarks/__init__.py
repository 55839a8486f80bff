"""The project's measurements, outside the installed package: throughput and time to accuracy against a
faithful reference implementation (`bench`), the paper's ablations (`ablate`) and transfer study (`transfer`).

Run from the repository's root: `.venv/bin/python -m benchmarks --help`. Results go to docs/, each with the
commit, machine and command that produced it.
"""
