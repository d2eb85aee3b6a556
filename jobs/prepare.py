"""Ray job entrypoint: prepare a dataset on the cluster this job was submitted to.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/prepare.py --demo --seq-len 128 --out s3://datasets/demo-128

Same arguments as `protscale data prepare`; inputs and --out are usually s3:// URIs (the cluster's
MinIO, reached through AWS_ENDPOINT_URL and the ray-storage credentials of the Ray pods).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

from protscale.cli import main  # noqa: E402

if __name__ == "__main__":
    # Inside a Ray job the driver joins the job's cluster: RAY_ADDRESS is set by the job supervisor.
    sys.exit(main(["data", "prepare", *sys.argv[1:], "--address", os.environ.get("RAY_ADDRESS", "auto")]))
