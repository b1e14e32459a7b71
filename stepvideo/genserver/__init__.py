"""The generation server: ``run_parallel.py --serve`` keeps the DiT loaded on every rank and runs
video jobs submitted over HTTP. ``jobs``: the job schema and store; ``app``: the HTTP API and the
web page; ``loop``: the ranks' job loop; ``client``: a small client for scripts and the suite
runner."""
