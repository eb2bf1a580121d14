"""`retrieve serve`: the HTTP service and its page."""

from __future__ import annotations

import click

from .common import (
    device_option,
    index_option,
    reports_errors,
)


@click.command("serve")
@index_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 exposes the index to the network.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-upload-mb", default=20.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True), help="Largest query upload accepted.")
@click.option("--shard-index", "shard_dirs", multiple=True, type=click.Path(file_okay=False),
              help="Another index folder searched as a shard beside --index (repeatable).")
@click.option("--shard", "shard_urls", multiple=True, metavar="URL",
              help="A `retrieve serve` on another machine searched as a shard (repeatable).")
@device_option
@reports_errors
def serve_command(index_dir: str, host: str, port: int, max_upload_mb: float,
                  shard_dirs: tuple[str, ...], shard_urls: tuple[str, ...], device: str) -> None:
    """Serve the index: a JSON API (docs at /docs) and a search page at /.

    The model loads once, so queries take milliseconds; a build running beside the server is
    seen without a restart. Route CLI searches through it with --server URL. With shards, each
    search goes to --index and every shard, and their best hits are merged by score.
    """
    import uvicorn

    from ..serve.app import create_app

    app = create_app([index_dir, *shard_dirs], device=device, max_upload_mb=max_upload_mb,
                     shard_urls=shard_urls)
    shards = len(shard_dirs) + len(shard_urls)
    click.echo(f"serving {index_dir}{f' and {shards} shards' if shards else ''} at http://{host}:{port} "
               f"(API docs at /docs); Ctrl-C stops", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
