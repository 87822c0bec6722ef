"""The identifier check: one rare token is fine; a split identifier or a common word is warned about."""

from __future__ import annotations

from transformers import CLIPTokenizer

from posebooth.identifier import check_identifier


def test_identifier_check(tiny_sd):
    tok = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    sks = check_identifier(tok, "sks")
    assert sks["tokens"] == ["sks</w>"] and sks["warnings"] == []
    split = check_identifier(tok, "pkblz")
    assert len(split["tokens"]) > 1 and "splits into" in split["warnings"][0]
    common = check_identifier(tok, "dog")
    assert common["tokens"] == ["dog</w>"] and "is a common word" in common["warnings"][0]
