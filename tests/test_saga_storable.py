"""``sync_server.saga.storable``: text every backend can store, and telling a refusal of
the data from an outage (issue 11, finding 12 and "no poison batch")."""

from __future__ import annotations

import asyncpg
from hypothesis import given
from hypothesis import strategies as st

from protocol import StorageError
from sync_server.saga.storable import (
    REPLACEMENT,
    refused_by_database,
    storable_json,
    storable_text,
)


def test_nul_and_lone_surrogates_become_the_replacement_character():
    assert storable_text("plain ascii") == "plain ascii"
    assert storable_text("a\x00b") == f"a{REPLACEMENT}b"
    assert storable_text("\ud800x\udfff") == f"{REPLACEMENT}x{REPLACEMENT}"
    assert storable_text("caf\u00e9 \U0001f600") == "caf\u00e9 \U0001f600"  # valid text stays
    value = {"k\x00": ["\ud83d", ("t\x00",), 3, None, 1.5], "ok": {"n": "\x00"}}
    assert storable_json(value) == {
        f"k{REPLACEMENT}": [REPLACEMENT, [f"t{REPLACEMENT}"], 3, None, 1.5],
        "ok": {"n": REPLACEMENT},
    }


@given(st.text())
def test_storable_text_always_encodes_as_utf8_without_nul(text):
    out = storable_text(text)
    assert "\x00" not in out and len(out) == len(text)
    out.encode("utf-8")  # never raises


def test_refusals_of_the_data_are_told_from_outages():
    def wrapped(cause: BaseException) -> StorageError:
        try:
            raise StorageError("PostgreSQL failed") from cause
        except StorageError as exc:
            return exc

    assert refused_by_database(wrapped(asyncpg.CharacterNotInRepertoireError("0x00")))
    assert refused_by_database(wrapped(asyncpg.exceptions.NumericValueOutOfRangeError("big")))
    assert refused_by_database(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates"))
    assert not refused_by_database(wrapped(asyncpg.ConnectionDoesNotExistError("gone")))
    assert not refused_by_database(wrapped(asyncpg.DeadlockDetectedError("deadlock")))
    assert not refused_by_database(wrapped(OSError("connection refused")))
    assert not refused_by_database(StorageError("no cause"))
