"""Operator settings, applied in the ``@kopf.on.startup`` handler.

kopf keeps its bookkeeping (last handled spec, handler progress) in annotations under our own
prefix, so the status holds only what users read (conditions, pools, endpoint).
"""

from __future__ import annotations

import logging
import os

import kopf

PREFIX = "splitserve.io"


def configure(settings: kopf.OperatorSettings) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    settings.posting.level = logging.INFO
    # reconnect watches regularly so a silently dropped connection heals within a minute
    settings.watching.server_timeout = int(os.environ.get("SPLITSERVE_WATCH_TIMEOUT", "60"))
    settings.watching.client_timeout = settings.watching.server_timeout + 10
    settings.execution.max_workers = int(os.environ.get("SPLITSERVE_OPERATOR_WORKERS", "4"))
