"""A minimal reader of TensorFlow's checkpoint "tensor bundle" format (TF >= 1.0 V2
checkpoints: `<prefix>.index` + `<prefix>.data-NNNNN-of-MMMMM`), without tensorflow.

What it reads: the `.index` file is a LevelDB-style table (uncompressed: TF writes it with
kNoCompression) mapping each variable name to a BundleEntryProto (dtype, shape, shard,
offset, size); the empty key holds a BundleHeaderProto (number of shards, endianness).
The tensor bytes are read from the data shard at (offset, size).

Supported: numeric dtypes (float16/32/64, bfloat16, int8-64, uint8, bool), any number of
shards, little- and big-endian bundles. Skipped: string tensors. Refused: partitioned
variables (entries with slices). Not supported: the pre-1.0 V1 format (one file of
SavedTensorSlices).
"""
from __future__ import annotations

import os
import struct
from collections import OrderedDict
from typing import Dict, Iterator, Tuple

import numpy as np

from ._common import PretrainedFormatError, naming_file

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48
_BLOCK_TRAILER_SIZE = 5   # 1 byte compression type + 4 bytes crc
# tensorflow/core/framework/types.proto DataType values -> numpy dtypes.
_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8, 9: np.int64,
           10: np.bool_, 14: "bfloat16", 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64}
_DT_STRING = 7


def _varint(data: bytes, position: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        if position >= len(data):
            raise PretrainedFormatError("truncated varint in the checkpoint index")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7


def _proto_fields(data: bytes) -> Iterator[Tuple[int, int, object]]:
    """(field number, wire type, value) of a serialized protobuf message."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _varint(data, position)
        elif wire in (1, 2, 5):
            if wire == 2:
                length, position = _varint(data, position)
            else:
                length = 8 if wire == 1 else 4
            if position + length > len(data):
                raise PretrainedFormatError("truncated protobuf field in the checkpoint index")
            value, position = data[position:position + length], position + length
        else:
            raise PretrainedFormatError(f"unsupported protobuf wire type {wire} in the checkpoint index")
        yield field, wire, value


def _block_entries(block: bytes) -> Iterator[Tuple[bytes, bytes]]:
    """Key/value pairs of one table block (keys prefix-compressed against the previous key)."""
    if len(block) < 4:
        raise PretrainedFormatError("checkpoint index block too short")
    restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 * (restarts + 1)
    if end < 0:
        raise PretrainedFormatError("checkpoint index block with more restart points than bytes (damaged?)")
    position, key = 0, b""
    while position < end:
        shared, position = _varint(block, position)
        unshared, position = _varint(block, position)
        value_length, position = _varint(block, position)
        if shared > len(key) or position + unshared + value_length > end:
            raise PretrainedFormatError("checkpoint index entry runs past its block (damaged?)")
        key = key[:shared] + block[position:position + unshared]
        position += unshared
        yield key, block[position:position + value_length]
        position += value_length


def _read_block(data: bytes, handle: bytes) -> bytes:
    offset, position = _varint(handle, 0)
    size, _ = _varint(handle, position)
    if offset + size + _BLOCK_TRAILER_SIZE > len(data):
        raise PretrainedFormatError("checkpoint index block points past the end of the file (truncated?)")
    if data[offset + size] != 0:
        raise PretrainedFormatError("compressed checkpoint index blocks are not supported")
    return data[offset:offset + size]


def _table_items(data: bytes) -> Iterator[Tuple[bytes, bytes]]:
    if len(data) < _FOOTER_SIZE:
        raise PretrainedFormatError("checkpoint index too short to be a table")
    footer = data[-_FOOTER_SIZE:]
    if struct.unpack("<Q", footer[-8:])[0] != _TABLE_MAGIC:
        raise PretrainedFormatError("not a TensorFlow checkpoint index (bad table magic)")
    _, position = _varint(footer, 0)          # metaindex handle: offset
    _, position = _varint(footer, position)   # metaindex handle: size
    index_handle = footer[position:]
    for _, data_handle in _block_entries(_read_block(data, index_handle)):
        yield from _block_entries(_read_block(data, data_handle))


def _entry(value: bytes) -> dict:
    entry = {"dtype": 0, "shape": [], "shard": 0, "offset": 0, "size": 0, "sliced": False, "endian": 0}
    for field, _, content in _proto_fields(value):
        if field == 1:
            entry["dtype"] = content
        elif field == 2:
            for dim_field, _, dim in _proto_fields(content):
                if dim_field == 2:   # TensorShapeProto.dim
                    size = next((v for f, _, v in _proto_fields(dim) if f == 1), 0)
                    entry["shape"].append(size)
        elif field == 3:
            entry["shard"] = content
        elif field == 4:
            entry["offset"] = content
        elif field == 5:
            entry["size"] = content
        elif field == 7:
            entry["sliced"] = True
    return entry


def _resolve_prefix(path: str) -> str:
    """Accepts the checkpoint prefix, its .index file, or a directory with a `checkpoint` file."""
    if path.endswith(".index"):
        return path[:-len(".index")]
    if os.path.isdir(path):
        state = os.path.join(path, "checkpoint")
        if not os.path.exists(state):
            raise PretrainedFormatError(f"{path}: a directory without a `checkpoint` file; pass the prefix")
        with open(state, encoding="utf8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model_checkpoint_path:"):
                    name = line.split(":", 1)[1].strip().strip('"')
                    return name if os.path.isabs(name) else os.path.join(path, name)
        raise PretrainedFormatError(f"{state}: no model_checkpoint_path line")
    return path


def is_tf_checkpoint(path) -> bool:
    try:
        prefix = _resolve_prefix(os.fspath(path))
    except PretrainedFormatError:
        return False
    return os.path.exists(prefix + ".index")


def read_tf_checkpoint(path) -> "OrderedDict[str, np.ndarray]":
    """{variable name: array} of a TF V2 checkpoint, in the index's (sorted) order.

    path: the checkpoint prefix ("model.ckpt-1000"), its .index file, or a directory with
    a `checkpoint` state file."""
    prefix = _resolve_prefix(os.fspath(path))
    index_path = prefix + ".index"
    if not os.path.exists(index_path):
        raise PretrainedFormatError(f"{index_path} not found (pass the checkpoint prefix, e.g. model.ckpt-1000)")
    with open(index_path, "rb") as handle:
        index = handle.read()
    shards, big_endian = 1, False
    entries: "OrderedDict[str, dict]" = OrderedDict()
    with naming_file(index_path):
        for key, value in _table_items(index):
            if key == b"":
                for field, _, content in _proto_fields(value):
                    if field == 1:
                        shards = content
                    elif field == 2:
                        big_endian = content == 1
                continue
            try:
                entries[key.decode("utf8")] = _entry(value)
            except UnicodeDecodeError:
                raise PretrainedFormatError(f"variable name {key[:40]!r} is not UTF-8 (damaged index?)") from None
    tensors: "OrderedDict[str, np.ndarray]" = OrderedDict()
    handles: Dict[int, object] = {}
    data_paths: Dict[int, str] = {}
    try:
        for name, entry in entries.items():
            if entry["sliced"]:
                raise PretrainedFormatError(f"{index_path}: {name}: partitioned variables (tensor slices) are not "
                                            "supported")
            if entry["dtype"] == _DT_STRING:
                continue
            if entry["dtype"] not in _DTYPES:
                raise PretrainedFormatError(f"{index_path}: {name}: unsupported TensorFlow dtype enum {entry['dtype']}")
            shard = entry["shard"]
            if shard not in handles:
                data_paths[shard] = f"{prefix}.data-{shard:05d}-of-{shards:05d}"
                if not os.path.exists(data_paths[shard]):
                    raise PretrainedFormatError(f"{data_paths[shard]} not found (the index names {shards} shard(s))")
                handles[shard] = open(data_paths[shard], "rb")
            stream = handles[shard]
            stream.seek(entry["offset"])
            raw = stream.read(entry["size"])
            if len(raw) != entry["size"]:
                raise PretrainedFormatError(f"{data_paths[shard]}: ends before the tensor {name} (truncated?)")
            dtype = _DTYPES[entry["dtype"]]
            item_bytes = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
            if len(raw) % item_bytes:
                raise PretrainedFormatError(f"{index_path}: {name}: {len(raw)} bytes are not whole {item_bytes}-byte "
                                            "values (damaged index?)")
            if dtype == "bfloat16":   # the high half of a float32
                bits = np.frombuffer(raw, dtype=">u2" if big_endian else "<u2").astype(np.uint32) << 16
                array = bits.view(np.float32)
            else:
                array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder(">" if big_endian else "<"))
            expected = int(np.prod(entry["shape"])) if entry["shape"] else 1
            if array.size != expected:
                raise PretrainedFormatError(f"{index_path}: {name}: {array.size} values for shape {entry['shape']}")
            tensors[name] = array.astype(array.dtype.newbyteorder("=")).reshape(entry["shape"])
    finally:
        for stream in handles.values():
            stream.close()
    return tensors
