"""`retrieve serve`: the HTTP service and its page."""

from __future__ import annotations

import logging
import sys

import click

from ..core.types import MAX_UPLOAD_MB_RANGE
from .common import (
    device_option,
    index_option,
    media_cap_options,
    reports_errors,
)

LOCAL_ADDRESSES = ("127.0.0.1", "localhost", "::1")
DRAIN_S = 3  # seconds SIGTERM or Ctrl-C leaves running requests before the server exits


@click.command("serve")
@index_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 exposes the index to the network (needs --token).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--token", envvar="RETRIEVAL_TOKEN", metavar="TOKEN",
              help="Require `Authorization: Bearer TOKEN` on every API route (or set RETRIEVAL_TOKEN); "
              "open the page as http://HOST:PORT/#token=TOKEN.")
@click.option("--insecure", is_flag=True, help="Listen beyond localhost without a token.")
@click.option("--allow-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Another Host name to answer (repeatable; '*' any): others are refused, "
              "against DNS rebinding [default: localhost names and --host].")
@click.option("--allow-sql", is_flag=True, help="Accept raw SQL where= filters (still read-only "
              "and time-limited); otherwise only filter= is taken.")
@click.option("--where-timeout", default=3.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True), help="Seconds a where= filter may run.")
@click.option("--relative-paths", is_flag=True,
              help="Show paths relative to the indexed folders, not absolute ones.")
@click.option("--max-upload-mb", default=20.0, show_default=True, type=float,
              help="Largest query upload accepted, in megabytes "
              f"({MAX_UPLOAD_MB_RANGE[0]:g} to {MAX_UPLOAD_MB_RANGE[1]:g}).")
@media_cap_options(image="Largest query image decoded, in megapixels; larger ones are refused (413).",
                   audio="Longest query sound decoded; longer ones are refused (413).",
                   video="Longest query video decoded; longer ones are refused (413).")
@click.option("--shard-index", "shard_dirs", multiple=True, type=click.Path(file_okay=False),
              help="Another index folder searched as a shard beside --index (repeatable).")
@click.option("--shard", "shard_urls", multiple=True, metavar="URL",
              help="A `retrieve serve` on another machine searched as a shard (repeatable).")
@click.option("--shard-timeout", default=10.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Seconds a --shard may take; results without it are flagged partial.")
@click.option("--access-log/--no-access-log", default=True, show_default=True,
              help="One line per request on stderr: method, route, status, milliseconds.")
@click.option("--int8", is_flag=True,
              help="Encode text queries with the 8-bit text tower the build exported: about half "
              "the CPU time a query; rankings may differ a little.")
@device_option
@reports_errors
def serve_command(index_dir: str, host: str, port: int, token: str | None, insecure: bool,
                  allowed_hosts: tuple[str, ...], allow_sql: bool, where_timeout: float,
                  relative_paths: bool, max_upload_mb: float, max_megapixels: float,
                  max_audio_seconds: float, max_video_seconds: float,
                  shard_dirs: tuple[str, ...], shard_urls: tuple[str, ...], shard_timeout: float,
                  access_log: bool, int8: bool, device: str) -> None:
    """Serve the index: a JSON API (docs at /docs) and a search page at /.

    The model loads once, so queries take milliseconds; a build running beside the server is
    seen without a restart. Route CLI searches through it with --server URL. With shards, each
    search goes to --index and every shard, and their best hits are merged by score.
    """
    import uvicorn

    from ..serve.app import create_app

    if host not in LOCAL_ADDRESSES and not token and not insecure:
        raise click.UsageError(f"--host {host} exposes the index beyond this machine: give --token "
                               "(or RETRIEVAL_TOKEN), or --insecure to serve it to anyone")
    app = create_app([index_dir, *shard_dirs], device=device, max_upload_mb=max_upload_mb,
                     shard_urls=shard_urls, token=token or None, allow_sql=allow_sql,
                     where_timeout=where_timeout, allowed_hosts=[host, *allowed_hosts],
                     relative_paths=relative_paths, shard_timeout=shard_timeout,
                     max_megapixels=max_megapixels, max_audio_seconds=max_audio_seconds,
                     max_video_seconds=max_video_seconds, int8=int8)
    if access_log:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger = logging.getLogger("retrieval.access")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    shards = len(shard_dirs) + len(shard_urls)
    click.echo(f"serving {index_dir}{f' and {shards} shards' if shards else ''} at http://{host}:{port} "
               f"(API docs at /docs){' with a token' if token else ''}; Ctrl-C stops", err=True)
    class StoppingServer(uvicorn.Server):
        """uvicorn's server, that stops running SQL filters as soon as it is told to exit, so
        their requests are answered (503) within the drain instead of cut off after it."""

        def handle_exit(self, sig, frame) -> None:
            app.state.service.stop_filters()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=DRAIN_S)
    try:
        StoppingServer(config).run()
    finally:
        app.state.service.close()
