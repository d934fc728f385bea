"""Decoding the examples of a prepared split straight from their serialised `tf.train.Example` bytes.

Why not tfds's own decode: it walks every feature through its generic numpy decoders and cost about 170 us an
example here (of about 530 us for reading and decoding one 12 x 2500 example), most of it per-feature Python
work. The layout is fixed and simple (builder_base.features: fixed-shape float32 / bool / int32 tensors, scalars
and text), and a `tf.train.Example` is three nested length-delimited messages, so the one large field (`signal`,
a packed float list) becomes a zero-copy `np.frombuffer` and the rest is a few varints. `tests/test_builders.py`
checks that this decode equals tfds's on every feature of a prepared dataset.

Wire format (protobuf): Example{1: Features{1: map entry{1: key, 2: Feature{1: BytesList{1: bytes*},
2: FloatList{1: packed float}, 3: Int64List{1: packed varint}}}}}.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def _varint(buf: bytes, i: int) -> tuple[int, int]:
  shift = result = 0
  while True:
    b = buf[i]
    i += 1
    result |= (b & 0x7F) << shift
    if b < 0x80:
      return result, i
    shift += 7


def _fields(buf: bytes, start: int, end: int):
  """(field number, wire type, payload start, payload end) of each field of the message in buf[start:end]."""
  i = start
  while i < end:
    key, i = _varint(buf, i)
    number, wire = key >> 3, key & 7
    if wire == 2:
      n, i = _varint(buf, i)
      yield number, wire, i, i + n
      i += n
    elif wire == 0:
      j = i
      _, i = _varint(buf, i)
      yield number, wire, j, i
    elif wire == 5:
      yield number, wire, i, i + 4
      i += 4
    elif wire == 1:
      yield number, wire, i, i + 8
      i += 8
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")


def _int64s(buf: bytes, start: int, end: int) -> np.ndarray:
  """A packed varint list as int64 (negative values are 10-byte two's complement varints)."""
  raw = np.frombuffer(buf, np.uint8, end - start, start)
  if not (raw & 0x80).any():  # every value below 128 (masks, small ids): one byte each
    return raw.astype(np.int64)
  out, i = [], start
  while i < end:
    v, i = _varint(buf, i)
    out.append(v - (1 << 64) if v >= 1 << 63 else v)
  return np.asarray(out, np.int64)


def _feature(buf: bytes, start: int, end: int) -> tuple[str, Any]:
  for kind, _, s, e in _fields(buf, start, end):  # the oneof: exactly one list
    values = [(w, vs, ve) for _, w, vs, ve in _fields(buf, s, e)]
    if kind == 1:
      return "bytes", [buf[vs:ve] for _, vs, ve in values]
    if kind == 2:
      parts = [np.frombuffer(buf, "<f4", (ve - vs) // 4, vs) for _, vs, ve in values]
      return "float", parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros((0,), "<f4")
    if kind == 3:
      parts = [_int64s(buf, vs, ve) for _, vs, ve in values]  # packed or not, the payload is varints
      return "int", parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros((0,), np.int64)
  return "empty", None


def parse(serialized: bytes) -> dict[str, tuple[str, Any]]:
  """{feature name: (kind, values)}: kind "bytes" (list of bytes), "float" (float32 array, a view of the buffer),
  "int" (int64 array) or "empty"."""
  try:
    return _parse_length_delimited(serialized)
  except _OtherWireType:
    return _parse_any(serialized)


class _OtherWireType(Exception):
  """A field that is not length-delimited (an unpacked list): only the general walk reads it."""


def _length(buf: bytes, i: int) -> tuple[int, int]:
  b = buf[i]
  return (b, i + 1) if b < 0x80 else _varint(buf, i)


def _parse_length_delimited(buf: bytes) -> dict[str, tuple[str, Any]]:
  """What tfds writes (every field length-delimited, lists packed) in one pass without generators: the general walk
  (`_parse_any`) spent most of its 80-100 us an example here on per-field generator and varint calls."""
  out = {}
  i, end = 0, len(buf)
  while i < end:  # Example: 1 = Features
    tag = buf[i]
    if tag & 7 != 2:
      raise _OtherWireType
    n, i = _length(buf, i + 1)
    stop = i + n
    while tag == 0x0A and i < stop:  # Features: 1 = map entry {1: key, 2: Feature}
      entry_tag = buf[i]
      if entry_tag & 7 != 2:
        raise _OtherWireType
      n, i = _length(buf, i + 1)
      entry_end = i + n
      key, value = b"", ("empty", None)
      while entry_tag == 0x0A and i < entry_end:
        field_tag = buf[i]
        if field_tag & 7 != 2:
          raise _OtherWireType
        n, i = _length(buf, i + 1)
        if field_tag == 0x0A:
          key = buf[i:i + n]
        elif field_tag == 0x12:
          value = _feature_length_delimited(buf, i, i + n)
        i += n
      out[key.decode()] = value
      i = entry_end
    i = stop
  return out


def _feature_length_delimited(buf: bytes, i: int, end: int) -> tuple[str, Any]:
  if i >= end:
    return "empty", None
  kind = buf[i] >> 3  # the oneof: 1 BytesList, 2 FloatList, 3 Int64List
  if buf[i] & 7 != 2 or kind not in (1, 2, 3):
    raise _OtherWireType
  n, i = _length(buf, i + 1)
  spans, list_end = [], i + n
  while i < list_end:  # field 1 of the list: each bytes value, or the packed values
    if buf[i] != 0x0A:
      raise _OtherWireType
    n, i = _length(buf, i + 1)
    spans.append((i, i + n))
    i += n
  if kind == 1:
    return "bytes", [buf[s:e] for s, e in spans]
  if kind == 2:
    parts = [np.frombuffer(buf, "<f4", (e - s) // 4, s) for s, e in spans]
    return "float", parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros((0,), "<f4")
  parts = [_int64s(buf, s, e) for s, e in spans]
  return "int", parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros((0,), np.int64)


def _parse_any(serialized: bytes) -> dict[str, tuple[str, Any]]:
  """`parse` for any valid encoding of the messages (unpacked lists, any wire type)."""
  out = {}
  for number, _, s, e in _fields(serialized, 0, len(serialized)):
    if number != 1:
      continue
    for entry_number, _, es, ee in _fields(serialized, s, e):
      if entry_number != 1:
        continue
      key, value = b"", ("empty", None)
      for n, _, vs, ve in _fields(serialized, es, ee):
        if n == 1:
          key = serialized[vs:ve]
        elif n == 2:
          value = _feature(serialized, vs, ve)
      out[key.decode()] = value
  return out


class Decoder:
  """serialised example -> the dict tfds would decode it to, for the features `layout` describes.

  `layout` maps feature name -> (shape, numpy dtype, kind), as `like` reads it from an example tfds decoded; kind
  "array" comes back as an array of that dtype and shape (float32 tensors are read-only views of the bytes),
  "python" as a Python scalar, "text" as bytes.
  """

  def __init__(self, layout: Mapping[str, tuple[tuple[int, ...], Any, str]]):
    self.layout = {k: (tuple(shape), np.dtype(dtype), kind) for k, (shape, dtype, kind) in layout.items()}

  @classmethod
  def like(cls, example: Mapping[str, Any]) -> "Decoder":
    """The layout of an example tfds decoded (names, shapes, dtypes, text or not): decode the rest alike."""
    return cls({k: (np.shape(v), np.asarray(v).dtype, "text" if isinstance(v, bytes) else
                    "array" if isinstance(v, np.ndarray) else "python") for k, v in example.items()})

  def __call__(self, serialized: bytes) -> dict[str, Any]:
    found = parse(serialized)
    out = {}
    for name, (shape, dtype, kind) in self.layout.items():
      got, values = found.get(name, ("empty", None))
      if kind == "text":
        out[name] = values[0] if got == "bytes" and values else b""
        continue
      array = np.zeros(shape, dtype) if values is None else values.astype(dtype, copy=False).reshape(shape)
      out[name] = array.item() if kind == "python" else array
    return out
