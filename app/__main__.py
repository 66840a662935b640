"""L2T Studio, the web UI.

    python -m app                                   # http://127.0.0.1:7860
    python -m app --port 8080 --runs-dir runs --uploads-dir uploads --data-root /data
    python -m app --host 0.0.0.0 --auth alice:secret  # reachable from other machines, with a login

Trainings started from the page run as `python -m l2t.train` subprocesses and
keep running if the UI stops; the next `python -m app` re-attaches to them.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from app.ui import DEFAULT_HOST, DEFAULT_PORT


def parse_auth(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("expected user:password")
    return user, password


def exposure_warning(host: str, auth) -> str | None:
    """What to tell the user who opens the UI to other machines without a login."""
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = host == "localhost"
    if local or auth is not None:
        return None
    return (f"warning: listening on {host} without --auth: anyone who can reach this port can start trainings "
            "and read data under the working folder and each --data-root; give --auth USER:PASSWORD")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m app", description="L2T Studio: fine-tune, compare and export VLMs with the L2T loss.")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.add_argument("--auth", type=parse_auth, default=None, metavar="USER:PASSWORD", help="require this login")
    parser.add_argument("--runs-dir", default="runs", help="where run folders go (default runs)")
    parser.add_argument(
        "--data-root", action="append", default=[], metavar="FOLDER",
        help="a folder whose files the Data tab may read by path, besides the working folder (repeatable)",
    )  # fmt: skip
    parser.add_argument("--uploads-dir", default="uploads", help="where uploads go, one folder per browser session (default uploads)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if warning := exposure_warning(args.host, args.auth):
        print(warning, file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from app.ui import create, serve  # gradio and torch load only once the arguments are good

    # An unauthenticated public link must not let visitors read files on this machine.
    demo, context = create(
        args.runs_dir, args.uploads_dir, allow_server_paths=not (args.share and args.auth is None), data_roots=args.data_root
    )
    try:
        serve(demo, context, host=args.host, port=args.port, share=args.share, auth=args.auth)
    except KeyboardInterrupt:
        pass
    if context.jobs.running("train"):
        print("The training keeps running in the background; start the UI again to follow it.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
