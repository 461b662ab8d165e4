"""``read_jsonl_tail``: the last ``n`` records of a JSON-lines file, read backwards from its end,
are ``read_jsonl``'s last ``n`` for every block size (a line cut across blocks, a block of one
byte), with blank lines, and a torn end as one of the ``n`` lines (its record if it is whole)."""

from __future__ import annotations

import pytest

from hpcdl.util import read_jsonl, read_jsonl_tail


@pytest.mark.parametrize("block", [1, 2, 3, 7, 64, 1 << 16])
@pytest.mark.parametrize("ending", ["", '{"torn": ', '{"whole": "no newline"}'])
def test_the_tail_is_the_end_of_the_whole_read(tmp_path, block, ending):
    path = tmp_path / "x.jsonl"
    lines = [f'{{"i": {i}, "pad": "{"x" * (i * 5 % 13)}"}}\n' + ("\n" if i == 4 else "")
             for i in range(12)]  # fmt: skip
    path.write_text("".join(lines) + ending)
    whole = read_jsonl(path)
    for n in range(16):
        expected = whole[-(n - 1) :] if ending.startswith('{"torn') and n > 1 else whole[-n:]
        if n == 0 or (n == 1 and ending.startswith('{"torn')):
            expected = []
        assert read_jsonl_tail(path, n, block=block) == expected, n


def test_no_file_is_no_records(tmp_path):
    assert read_jsonl_tail(tmp_path / "none.jsonl", 5) == []
