"""TensorBoard event files written directly: TFRecord framing around hand-encoded `Event` protobufs (scalars, text,
the purge marker). No torch, TensorFlow or protobuf library: the few messages TensorBoard reads are encoded here.

Format (tensorflow/core/util/event.proto, summary.proto; TFRecord): each record is
  uint64 length | uint32 masked-crc32c(length) | data | uint32 masked-crc32c(data)   (little endian)
and `data` is an Event {1: double wall_time, 2: int64 step, 3: string file_version, 5: Summary, 7: SessionLog}.
Summary {1: repeated Value {1: string tag, 2: float simple_value, 8: TensorProto, 9: SummaryMetadata}}.
A SessionLog with status START at step s tells TensorBoard to drop this run's earlier events at steps >= s (a
resumed run redoes them).
"""
from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 as protobuf encodes it (negative: ten bytes)
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _bytes_field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _int_field(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value)


def _event(step: int, *, wall_time: float | None = None, file_version: str | None = None,
           summary: bytes | None = None, session_start: bool = False) -> bytes:
    out = _key(1, 1) + struct.pack("<d", time.time() if wall_time is None else wall_time) + _int_field(2, step)
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if summary is not None:
        out += _bytes_field(5, summary)
    if session_start:
        out += _bytes_field(7, _int_field(1, 1))  # SessionLog {status: START}
    return out


def scalar_summary(tag: str, value: float) -> bytes:
    value_msg = _bytes_field(1, tag.encode()) + _key(2, 5) + struct.pack("<f", value)
    return _bytes_field(1, value_msg)


def text_summary(tag: str, text: str) -> bytes:
    """A text-plugin summary: a scalar string tensor tagged with plugin_name "text" (what TensorBoard's text tab reads)."""
    shape = _bytes_field(2, _int_field(1, 1))  # TensorShapeProto {dim {size: 1}}
    tensor = _int_field(1, 7) + _bytes_field(2, shape) + _bytes_field(8, text.encode())  # dtype DT_STRING
    metadata = _bytes_field(1, _bytes_field(1, b"text"))  # SummaryMetadata {plugin_data {plugin_name: "text"}}
    value_msg = _bytes_field(1, tag.encode()) + _bytes_field(8, tensor) + _bytes_field(9, metadata)
    return _bytes_field(1, value_msg)


class EventFileWriter:
    """One `events.out.tfevents.*` file in `logdir`. `purge_step`: this run redoes steps >= it (a resume), so
    TensorBoard drops the earlier events there. Records are flushed on every `flush()` (and on close)."""

    def __init__(self, logdir: str | Path, *, purge_step: int | None = None, suffix: str = ""):
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = logdir / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}{suffix}"
        self._file = open(self.path, "ab")
        self._write(_event(0, wall_time=now, file_version="brain.Event:2"))
        if purge_step is not None:
            self._write(_event(purge_step, wall_time=now, session_start=True))

    def _write(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data)))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._write(_event(step, summary=scalar_summary(tag, value)))

    def add_text(self, tag: str, text: str, step: int) -> None:
        self._write(_event(step, summary=text_summary(tag, text)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
