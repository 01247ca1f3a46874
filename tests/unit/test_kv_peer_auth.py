"""The KV port accepts only peers holding the internal token, and can speak TLS."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtransfer import TransferError, make_receiver, make_sender
from pdserve.config import KVTransferConfig
from pdserve.errors import StatusCode
from tests.factories.tls import write_pem_pair
from tests.unit.test_kv_grpc_transport import (
    LAYOUT,
    NUM_TOKENS,
    ArraySink,
    ArraySource,
    DoneRecorder,
)

TOKEN = "kv-peer-token-1234567890abcdef"
BASE = dict(chunk_bytes=4096, max_message_bytes=128 * 1024, timeout_s=10.0)


def transfer(sender_config: KVTransferConfig, receiver_config: KVTransferConfig) -> object:
    receiver = make_receiver("grpc", LAYOUT, receiver_config)
    receiver.start()
    sender = make_sender("grpc", sender_config)
    try:
        source, sink = ArraySource(LAYOUT, NUM_TOKENS), ArraySink(LAYOUT, NUM_TOKENS)
        receiver.expect("t", NUM_TOKENS, sink, DoneRecorder())
        stats = sender.send(
            address=receiver.address, transfer_id="t", layout=LAYOUT, num_tokens=NUM_TOKENS,
            source=source, first_token_id=1,
        )
        assert (sink.keys == source.keys).all()
        return stats
    finally:
        receiver.cancel("t")
        sender.close()
        receiver.stop()


@pytest.mark.parametrize("sender_token", [None, "wrong-token-0000000000000"])
def test_peer_without_the_token_is_unauthenticated(sender_token: str | None) -> None:
    with pytest.raises(TransferError) as caught:
        transfer(
            KVTransferConfig(**BASE, auth_token=sender_token),
            KVTransferConfig(**BASE, auth_token=TOKEN),
        )
    assert caught.value.code is StatusCode.UNAUTHENTICATED


def test_peer_with_the_token_transfers() -> None:
    config = KVTransferConfig(**BASE, auth_token=TOKEN)
    assert transfer(config, config).num_bytes == LAYOUT.kv_bytes(NUM_TOKENS)


def test_tls_kv_port(tmp_path: Path) -> None:
    cert, key = write_pem_pair(tmp_path, "kv")
    tls = dict(tls_cert_file=str(cert), tls_key_file=str(key), tls_ca_file=str(cert))
    config = KVTransferConfig(**BASE, auth_token=TOKEN, **tls)
    assert transfer(config, config).num_bytes == LAYOUT.kv_bytes(NUM_TOKENS)
    plaintext_sender = KVTransferConfig(**BASE, auth_token=TOKEN)
    with pytest.raises(TransferError) as caught:
        transfer(plaintext_sender, config)
    assert caught.value.code is StatusCode.UNAVAILABLE
