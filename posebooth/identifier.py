"""Checking the rare-token identifier against the tokenizer (DreamBooth, Ruiz et al. 2022, section 4.1).

A good identifier is one token the text encoder knows little about (``sks`` in CLIP). One that splits into
several sub-tokens is weaker (``pkblz`` → ``pk``, ``bl``, ``z``), and a common word drags its meaning in.
"""

from __future__ import annotations

# CLIP's BPE vocabulary is ordered by merge frequency: whole-word tokens with a smaller id are more common.
COMMON_WORD_MAX_ID = 20000


def check_identifier(tokenizer, identifier: str) -> dict:
    """How ``identifier`` tokenizes, and warnings when it splits or is a common word."""
    tokens = tokenizer.tokenize(identifier)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    warnings = []
    if len(tokens) > 1:
        warnings.append(
            f"identifier {identifier!r} splits into {len(tokens)} tokens {tokens}: a single rare token "
            "(for example 'sks') is easier to bind to the subject"
        )
    elif ids and ids[0] < COMMON_WORD_MAX_ID:
        warnings.append(
            f"identifier {identifier!r} is a common word (token id {ids[0]}): its meaning leaks into the "
            "subject; prefer a rare token such as 'sks'"
        )
    return {"identifier": identifier, "tokens": tokens, "token_ids": ids, "warnings": warnings}
