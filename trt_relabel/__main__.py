"""`python -m trt_relabel` runs the CLI."""

from trt_relabel.cli import main

main()
