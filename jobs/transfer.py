"""Ray job entrypoint: a CLM→MLM transfer sweep (CLM parents first, then MLMs initialised from them).

    ray job submit --working-dir . -- python jobs/transfer.py search_spaces/paper_transfer.py \
        --tracking-uri http://mlflow:5000
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

from protscale.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:], "--ray-address", os.environ.get("RAY_ADDRESS", "auto")]))
