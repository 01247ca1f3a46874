"""What every replica actor does first: read its config and set up logging.

Imported inside Ray actors; torch-free so the actor modules stay importable by the driver.
"""

from __future__ import annotations

import logging

import msgpack

from pdserve.config import PdserveConfig, parse_config
from pdserve.messages import MAX_CONTROL_MESSAGE_BYTES


def encode_config(config: PdserveConfig) -> bytes:
    """The config as msgpack bytes, for actor constructors (never pickled)."""
    return msgpack.packb(config.to_dict(), use_bin_type=True)


def decode_config(data: bytes) -> PdserveConfig:
    if len(data) > MAX_CONTROL_MESSAGE_BYTES:
        raise ValueError("config message too large")
    return parse_config(msgpack.unpackb(data, raw=False), origin="<replica config>")


def setup_replica_logging(config: PdserveConfig, replica_id: str) -> None:
    logging.basicConfig(
        level=config.log_level,
        format=f"%(asctime)s %(levelname)s {replica_id} %(name)s: %(message)s",
        force=True,
    )
