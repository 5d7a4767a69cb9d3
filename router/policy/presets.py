"""The named policies: the one list of names that ``--policy``, the router's configuration and
the CRD's ``router.policy`` enum accept (``operator/crd.py`` reads it; a test keeps the chart's
copy equal). Each is a policy configuration in the format of ``--policy-config`` (``spec.py``).

Plain data, importing nothing, so the configuration can name the presets without loading a
plugin.
"""

from __future__ import annotations

from typing import Any

# kv_capacity first: a prompt no decode worker could ever hold is refused, whatever their health.
_DECODE_FILTERS = ["kv_capacity", "healthy", "kv_endpoint", "has_room"]

PRESETS: dict[str, dict[str, Any]] = {
    "round_robin": {
        "prefill": {"filters": ["healthy"], "picker": "round_robin"},
        "decode": {"filters": _DECODE_FILTERS, "picker": "round_robin"},
    },
    "least_loaded": {
        "prefill": {"filters": ["healthy"], "scorers": {"prefill_queue": 1.0}, "picker": "max_score"},
        "decode": {"filters": _DECODE_FILTERS, "scorers": {"decode_load": 1.0}, "picker": "max_score"},
    },
    # Prefill by prefix hit (plus a little load, to break ties and avoid piling on one worker).
    "prefix_aware": {
        "prefill": {"filters": ["healthy"], "scorers": {"prefix_hit": 1.0, "prefill_queue": 0.3},
                    "picker": "max_score"},
        "decode": {"filters": _DECODE_FILTERS, "scorers": {"decode_load": 1.0}, "picker": "max_score"},
    },
    # The pair most likely to meet both latency targets; queue (then shed) when none can.
    "goodput": {
        "prefill": {"filters": ["healthy"]},
        "decode": {"filters": _DECODE_FILTERS},
        "pair": {"scorers": {"ttft_slack": 1.0, "tpot_slack": 1.0}, "picker": "slo_slack"},
    },
}

POLICIES: tuple[str, ...] = tuple(PRESETS)
