"""Fuzz target: KV event batches off the wire (rocmforge.kv_events).

decode_batch on arbitrary bytes: the only exception allowed is ValueError (a
subscriber counts it as a malformed batch and goes on), and a batch that
decodes has a hashable instance name and encodes back to a payload that
decodes to the same batch.

    python fuzz/fuzz_events.py [libFuzzer flags] [CORPUS_DIR]     # tools/fuzz.sh runs it
"""

import sys

import atheris

with atheris.instrument_imports(include=["rocmforge"]):
    from rocmforge.kv_events import decode_batch, encode_batch


def one_input(data: bytes) -> None:
    try:
        ts, events, instance = decode_batch(data)
    except ValueError:
        return
    hash(instance)
    assert decode_batch(encode_batch(events, instance, ts=ts)) == (ts, events, instance)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
