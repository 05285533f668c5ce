"""Every metric object of the gateway: the shared ones of services.metrics and each worker's own module.

Importing this module registers every worker's metrics in the default registry and in services.metrics.GROUPS.
"""

from __future__ import annotations

from types import ModuleType

from prometheus_client.metrics import MetricWrapperBase

from modem_worker import metrics as modem_metrics
from result_reporter import metrics as result_metrics
from send_api import metrics as send_api_metrics
from services import metrics
from sync_worker import metrics as sync_metrics
from task_poller import metrics as task_metrics

MODULES: tuple[ModuleType, ...] = (metrics, modem_metrics, sync_metrics, task_metrics, result_metrics, send_api_metrics)


def metric_objects() -> list[MetricWrapperBase]:
    """Every metric object defined in (or re-exported by) the metrics modules, each once."""
    found: dict[int, MetricWrapperBase] = {}
    for module in MODULES:
        for obj in vars(module).values():
            if isinstance(obj, MetricWrapperBase):
                found.setdefault(id(obj), obj)
    return list(found.values())
