"""One module per DVC stage: `python -m tasks.<stage>`.

No telemetry from the libraries the stages use (set before they are imported; a user's own
setting wins): on an offline machine it only adds time-outs.
"""

import os

for _name, _value in {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
    os.environ.setdefault(_name, _value)
