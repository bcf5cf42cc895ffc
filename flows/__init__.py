"""Prefect flows that run the DVC graph.

No telemetry or update checks: on an offline machine they only add time-outs. Set before Prefect,
DVC or MLflow is imported; a user's own setting wins.
"""

import os

for _name, _value in {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
}.items():
    os.environ.setdefault(_name, _value)
