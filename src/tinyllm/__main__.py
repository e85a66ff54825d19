"""`python -m tinyllm` (and `torchrun -m tinyllm`) run the same CLI as the `tinyllm` script."""

from tinyllm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
