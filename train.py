"""Train an lmrep model: `python train.py fit --config configs/quickstart.yaml`."""

from lmrep.cli import main

if __name__ == "__main__":
    main()
