"""sdpipe: from a pile of data to a served, monitored diffusion model.

Stages, each a subpackage: `data` -> `models` -> `train` -> `sampling` -> `evaluate`; `pipeline` runs them
in order and `cli` is a thin typer layer over these functions.
"""

__version__ = "0.1.0"
