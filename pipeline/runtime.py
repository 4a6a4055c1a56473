"""Connecting a job's driver to Ray: one rule for every job in ``jobs/``.

``--address`` if given, else ``RAY_ADDRESS`` (``ray job submit`` sets it), else a new local Ray
(``address="local"``: never an unrelated Ray that happens to run on the same host), started
without its dashboard: a job's local Ray lives as long as the job, and the dashboard's start
doubled ``ray.init`` (8.4 → 16.6 s on the 2-core box, loaded; bench/NOTES.md). For a dashboard,
``ray start --head`` and pass ``--address auto``.
"""

from __future__ import annotations

import os

ADDRESS_HELP = (
    "Ray cluster to join ('auto': the one `ray start` runs here); "
    "default: RAY_ADDRESS (set by `ray job submit`), else a new local Ray"
)
NUM_CPUS_HELP = "CPUs of a Ray started here (default: all)"


def connect(address: str | None, num_cpus: int | None) -> bool:
    """``ray.init`` by the rule above, unless Ray is initialised already; ``num_cpus`` only
    applies to a Ray started here. True when it started a Ray here: its resources are all there
    will be (a joined cluster may still be adding nodes)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False)
        return True
    ray.init(address=address)
    return False
