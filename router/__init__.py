"""splitserve.router: the OpenAI-compatible gateway in front of the prefill and decode pools.

Entry points (imported from their modules so ``import splitserve.router`` stays cheap):

- ``splitserve.router.app.create_app(RouterConfig) -> FastAPI`` and ``splitserve router`` (cli.py)
- ``splitserve.router.config.RouterConfig`` / ``SLO`` / ``Limits``: the router's whole configuration
- ``splitserve.router.policy.build_policy(name_or_spec)``: a preset (round_robin, least_loaded,
  prefix_aware, goodput: ``policy/presets.py``) or a ``PolicySpec`` (``--policy-config FILE``)

Modules, in request order: connection_limits (the HTTP server's protocol: connection count,
header and idle timeouts) -> app (the ASGI app: built from the config; FastAPI for /v1/models,
/health, /metrics) -> completions (the two completion endpoints as plain ASGI) -> openai_api
(request bodies) -> tokenizer -> choices (token limits, fan-out of n, JSON and SSE shapes) ->
dispatch (admission, pick, decode stream + prefill, retry; admission: waits for the pool's
rounds) -> policy/ -> workers (HTTP calls; http1, the keep-alive client of the hot path) -> pool
(health and load polling) <- ``splitserve.discovery`` (static URLs or Redis); output (detokenize, stop strings),
logprobs, codec (orjson), metrics, errors, auth; processes (one server process, or
``--workers N`` on one port), cli (``splitserve router``), ``python -m splitserve.router`` (the
router command alone).
"""
