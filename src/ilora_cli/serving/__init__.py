"""``ilora serve``: recommendations over HTTP, each user with their own mixture of experts, users batched.

config.py    ServeConfig: address, API key, batching, limits
batching.py  the dynamic batcher: users collected for max_wait_ms, scored together on one model thread
service.py   the run behind the API: loading, checking each user's request, answers as `recommend --json`
app.py       the FastAPI app: routes, schemas, errors as one sentence, body limit, Prometheus metrics
server.py    binding the socket, uvicorn, graceful shutdown on SIGTERM

The server's libraries (FastAPI, uvicorn, prometheus-client) are the optional extra ``ilora[serve]``; only
``server.py`` and ``app.py`` import them.
"""
