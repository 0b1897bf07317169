"""`python -m bench.tta`: the benchmark the package docstring describes."""

from bench.tta.cli import main

if __name__ == "__main__":
    main()
