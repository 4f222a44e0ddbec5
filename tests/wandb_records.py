"""Read an offline W&B run back: the `.wandb` file is a LevelDB-style log of protobuf records after a 7-byte
header (b":W&B", a magic number, a version): 32 KiB blocks of chunks, each with a CRC, a length and a type."""

import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, pending = HEADER, b""
    while position + HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < HEADER:  # the block's tail is padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        payload = data[position + HEADER : position + HEADER + length]
        position += HEADER + length
        if kind == 0 and length == 0:
            break
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def logged(run_dir: Path) -> tuple[dict, dict]:
    """(config, metrics) of an offline run folder: config keys to JSON values, metric names to their values."""
    import json

    (path,) = Path(run_dir).glob("run-*.wandb")
    config, metrics = {}, {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            for item in record.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "history":
            for item in record.history.item:
                metrics.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
    return config, metrics
