"""``protscale submit | status | logs | stop``: Ray jobs over the Ray Jobs API (see cluster/submit.py)."""

from __future__ import annotations

import argparse

ADDRESS_HELP = "Ray Jobs API (dashboard) URL; default $RAY_ADDRESS or http://127.0.0.1:8265"


def add_commands(sub) -> None:
    p = sub.add_parser(
        "submit", help="run a command as a Ray job on a Ray cluster (local or KubeRay)",
        description="Submit ENTRYPOINT as a Ray job: the working directory is uploaded (.gitignore "
        "honoured), platform/protscale is shipped as a py_module when the working directory is a "
        "protscale checkout, and the job's logs are followed until it ends (exit 0 if it succeeded). "
        "Token-authenticated clusters: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH).",
        epilog="example: protscale submit --address http://127.0.0.1:8265 --pip "
        "k8s/ray-runtime-requirements.txt -- python jobs/sweep.py search_spaces/demo_cpu.py "
        "--tracking-uri http://mlflow:5000")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--working-dir", default=".", metavar="DIR",
                   help="directory uploaded as the job's working directory (default: .)")
    p.add_argument("--no-working-dir", dest="working_dir", action="store_const", const=None,
                   help="upload nothing (the command must exist on the cluster)")
    p.add_argument("--env", action="append", default=[], metavar="KEY[=VAL]",
                   help="environment variable for the job (repeatable); a bare KEY copies it from here, "
                   "e.g. --env MLFLOW_TRACKING_URI")
    p.add_argument("--pip", action="append", default=[], metavar="REQ|FILE",
                   help="pip requirement or requirements file installed for the job (repeatable)")
    p.add_argument("--no-package", dest="package", action="store_false",
                   help="do not ship platform/protscale as a py_module")
    p.add_argument("--submission-id", help="job id to use (default: generated)")
    p.add_argument("--no-wait", dest="wait", action="store_false",
                   help="print the job id and return instead of following the logs")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER, metavar="-- ENTRYPOINT ...",
                   help="the command to run, after --")
    p.set_defaults(func=_submit)

    p = sub.add_parser("status", help="status of a Ray job")
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.set_defaults(func=lambda a: _submit_module().status(a.job_id, a.address))

    p = sub.add_parser("logs", help="logs of a Ray job")
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    p.set_defaults(func=lambda a: _submit_module().logs(a.job_id, a.address, follow=a.follow))

    p = sub.add_parser("stop", help="stop a Ray job")
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--no-wait", dest="wait", action="store_false",
                   help="return once the stop is requested")
    p.set_defaults(func=lambda a: _submit_module().stop(a.job_id, a.address, wait=a.wait))


def _submit_module():
    from protscale.cluster import submit

    return submit


def _submit(args) -> int:
    m = _submit_module()
    return m.submit(args.entrypoint, address=args.address, working_dir=args.working_dir,
                    env=m.parse_env(args.env), pip=m.parse_pip(args.pip), package=args.package,
                    submission_id=args.submission_id, wait=args.wait)
