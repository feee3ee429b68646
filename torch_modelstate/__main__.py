"""``python -m torch_modelstate``: the command line (see `torch_modelstate.cli`)."""

from torch_modelstate.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
