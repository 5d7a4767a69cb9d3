"""splitserve.worker: what the prefill and decode workers share (the HTTP shell around the
engine). ``options`` (flags -> frozen ``WorkerOptions``; torch-free), ``cli`` (the worker
commands; a role registers with the function that builds its app), ``shell`` (engine thread,
common routes, guard, registry heartbeat, server loop), ``handshake`` (the KV connector each side
opens), ``block_lease`` (who owns a request's KV blocks), ``metrics``.

Imports point down only: ``prefill/`` and ``decode/`` import this package; it imports the engine,
``kvtransfer``, ``discovery``, ``protocol`` and ``trust``, never a role or the router.
"""
