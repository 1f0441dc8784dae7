"""``python -m mlmi_zoo.training train|finetune ...`` (also the entry under ``torchrun -m``)."""
import sys

from mlmi_zoo.training.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
