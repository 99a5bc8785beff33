"""``hmar serve``: the web demo (Gradio) for generation, in-painting and out-painting."""
from __future__ import annotations

import argparse
import sys

from ..errors import HMARError
from .common import add_model_args, load_pipeline


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the web demo (needs gradio==6.31.0)",
                       description="Serve a web page with three tabs: Generate, Inpaint (paint a mask), Outpaint. "
                                   "Listens on 127.0.0.1 only unless --host says otherwise. Uploads are bounded in "
                                   "bytes and pixels, only images are accepted, no path a visitor names is read or "
                                   "written, and requests wait in a bounded queue.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0 exposes the demo to the network: only do that on purpose)")
    p.add_argument("--port", type=int, default=7860, help="TCP port")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload, in MiB (HTTP 413 above)")
    p.add_argument("--max-pixels", type=int, default=16_000_000,
                   help="largest accepted image, in pixels (refused from the file header, before decoding)")
    p.add_argument("--concurrency", type=int, default=1, help="requests computed at the same time")
    p.add_argument("--max-queue", type=int, default=32, help="requests that may wait; more are refused")
    p.set_defaults(func=run)


def _check_address(host: str, port: int) -> None:
    """The address resolves and the port is free, before the model loads (else Gradio says so after it, with its
    own advice about GRADIO_SERVER_PORT)."""
    import socket
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise HMARError(f"--host {host}: cannot resolve it ({e}): use 127.0.0.1, 0.0.0.0 or this machine's "
                        "name") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind(addr)
        except OSError as e:
            raise HMARError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}): pick another "
                            "--port (or stop what is using it)") from None


def run(args: argparse.Namespace) -> int:
    from ..app import check_limits, launch
    if not 0 < args.port < 65536:
        raise HMARError(f"--port must be between 1 and 65535, got {args.port}")
    check_limits(args.max_upload_mb, args.max_pixels, args.concurrency, args.max_queue)  # before the model loads
    _check_address(args.host, args.port)
    try:
        import gradio  # noqa: F401
    except ModuleNotFoundError:
        raise HMARError("the web demo needs gradio: pip install gradio==6.31.0") from None
    notes = []
    pipe = load_pipeline(args, say=notes.append)
    notice = None
    if pipe.is_random:
        notice = ("**Notice:** no trained model is loaded: this demo runs a RANDOMLY INITIALISED tiny model "
                  "(hmar-tiny), so every image is noise. Start it with `hmar serve --checkpoint DIR` for a trained model.")
        print("note: serving a RANDOMLY INITIALISED tiny model (images are noise); pass --checkpoint for a trained one",
              file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: the demo is reachable from other machines", file=sys.stderr)
    launch(pipe, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels,
           concurrency=args.concurrency, max_queue=args.max_queue, notice=notice, block=True)
    return 0
