"""The HTTP service, sharded fan-out, the client and the page."""
