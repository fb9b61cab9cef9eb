"""Serving stage: an HTTP API over a saved model, with dynamic batching that never changes an image.

`create_app(resolver, settings, api_keys)` builds the FastAPI app; `sdpipe serve` runs it on uvicorn.
FastAPI and uvicorn are imported only by `sdpipe.serve.app` and the command, not by this package.
"""
