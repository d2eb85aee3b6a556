"""Ray job entrypoint: fit scaling and transfer laws from the tracking store.

    ray job submit --working-dir . -- python jobs/fit.py --experiment paper-clm \
        --tracking-uri http://mlflow:5000 --out /tmp/fit
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

from protscale.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["fit", *sys.argv[1:]]))
