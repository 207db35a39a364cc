"""What a fault-suite child process runs: one ingested task through the pipeline's own steps, as
``continual_update`` runs them. Kept apart from ``tests/test_faults.py`` so a child imports only cliploop's
components (not pytest or Prefect): every second of a child's start-up is paid once per fault row.

``python -m tests.fault_steps CONFIG_JSON TASK_ID`` (the portable config as JSON).
"""

from __future__ import annotations

import json
import sys

from components.pipeline import chain, registration, steps


def learn_steps(cfg, task_id: str) -> tuple[int, dict]:
    """Reconcile, start learning, build the pool if the method builds one, train + evaluate, register:
    (version, update)."""
    chain.reconcile(cfg)
    parent = chain.head(cfg)["version"]
    chain.start_learning(cfg, task_id)
    pools = {task_id: steps.build_pool(cfg, task_id)["pool_dir"]} if steps.builds_pools(cfg) else {}
    update = steps.run_update(cfg, task_id, parent, pools)
    return registration.register_update(cfg, update)["version"], update


if __name__ == "__main__":
    from components.settings.config_loading import config_from_doc

    learn_steps(config_from_doc(json.loads(sys.argv[1])), sys.argv[2])
