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

  `layout` maps feature name -> (shape, numpy dtype, is_text), as `like` reads it from an example tfds decoded. Tensors come back as arrays of their dtype and shape, scalars as numpy scalars, text as bytes.
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
