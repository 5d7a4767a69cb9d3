"""splitserve.discovery: how routers find workers. Workers announce themselves
(``registry.start_heartbeat``: a Redis key with a TTL, kept alive by a thread); routers read the
announcements (``registry.RedisRegistry``) or a fixed list (``registry.StaticRegistry``).

Both sides import this package and nothing else of each other: it stands below the router and
the workers, and imports only ``splitserve.trust`` (the registry entries' MACs) and redis.
"""
