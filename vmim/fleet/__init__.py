"""The fleet: box actions and lists sent through RabbitMQ to one worker per host (docs/fleet.md)."""

import os
from typing import Any, Optional

#: the broker URL when neither --broker nor the config gives one
ENV_BROKER = "VMIM_BROKER"


def broker_url(cli_broker: Optional[str], cfg: Any) -> Optional[str]:
    """--broker, else $VMIM_BROKER, else broker in the config (cfg: None when it could not be
    loaded); None: run here. Light: a local run imports nothing of the fleet beyond this."""
    return cli_broker or os.environ.get(ENV_BROKER) or (cfg.broker if cfg else None)

