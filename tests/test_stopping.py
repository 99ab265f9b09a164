from ead.stopping import StopChecker

# A toy "tokenizer": each id is one piece of text; id 0 is end-of-sequence and decodes to nothing.
PIECES = {0: "", 1: "The", 2: " answer", 3: " is", 4: " 4", 5: "2", 6: ".\n", 7: "\n", 8: "Q", 9: ":", 10: "\ufffd"}


def decode(ids):
    return "".join(PIECES[i] for i in ids)


def run(ids, stop=(), max_new_tokens=100):
    checker = StopChecker(decode, {0}, stop, max_new_tokens)
    shown = []
    for n in range(1, len(ids) + 1):
        reason = checker.update(ids[:n])
        shown.append(checker.text[:checker.visible_chars])
        if reason:
            return reason, checker.text, shown, n
    return None, checker.text, shown, len(ids)


def test_eos_ends_and_is_not_in_the_text():
    assert run([1, 2, 0, 3])[:2] == ("stop", "The answer")


def test_stop_string_cuts_the_text_before_it_and_stops():
    reason, text, _, n = run([1, 2, 3, 4, 5, 6, 7, 8, 9, 4], stop=("\n\nQ:", "zzz"))
    assert (reason, text, n) == ("stop", "The answer is 42.", 9)


def test_stop_string_across_tokens_is_held_back_while_streaming():
    _, _, shown, _ = run([1, 2, 3, 4, 5, 6, 7, 8, 9], stop=("\n\nQ:",))
    # After ".\n" the text ends in a prefix of the stop string: the "\n" is held back, and never shown later.
    assert shown[5] == "The answer is 42."
    assert all(shown[i].startswith(shown[i - 1]) for i in range(1, len(shown)))
    assert "\n" not in shown[-1]


def test_partial_utf8_character_is_held_back():
    _, _, shown, _ = run([1, 10, 2])
    assert shown[1] == "The"


def test_max_new_tokens():
    assert run([1, 2, 3, 4, 5], max_new_tokens=3)[0:2] == ("length", "The answer is")


def test_incremental_text_equals_a_full_decode_with_a_byte_level_tokenizer(tiny_pairs):
    """Random ids of a byte-level BPE tokenizer (multi-byte characters split across tokens included): at every
    step the checker's text is the tokenizer's decode of all ids, while it decodes only a short tail."""
    import random

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_pairs["qwen2"][0])
    calls = []

    def decode(ids):
        calls.append(len(ids))
        return tok.decode(ids, skip_special_tokens=True)

    rng = random.Random(0)
    ids = tok("Zoë paid 12€ — 3×4 = 12 ✓ 日本 ").input_ids * 3 + [rng.randrange(len(tok)) for _ in range(300)]
    checker = StopChecker(decode, set(), (), 10_000)
    for n in range(1, len(ids) + 1):
        checker.update(ids[:n])
        assert checker.text == tok.decode(ids[:n], skip_special_tokens=True), f"after {n} ids"
    assert max(calls[-50:]) < 40  # the tail, not the whole text


def test_incremental_text_stays_exact_when_a_split_changes_the_text():
    """A SentencePiece-like decoder drops the leading space of what it decodes, so no split is exact: the
    checker must notice and keep decoding from the start, never showing a wrong text."""
    words = {1: " one", 2: " two", 3: " three"}

    def decode(ids):
        return "".join(words[i] for i in ids).lstrip(" ")

    ids = [1, 2, 3] * 20
    checker = StopChecker(decode, set(), (), 1000)
    for n in range(1, len(ids) + 1):
        checker.update(ids[:n])
        assert checker.text == decode(ids[:n])


def test_generated_ids_given_with_the_prompt_and_an_offset_read_the_same(tiny_pairs):
    """The engine hands the checker prompt + generated ids and where the generated ones start, not a copy: text,
    settling and the max_new_tokens count must be those of the generated ids alone."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_pairs["qwen2"][0])
    prompt = tok("Question: what is 3×4? ").input_ids
    generated = tok("Zoë paid 12€ — 3×4 = 12 ✓ 日本 and so on").input_ids * 2
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    alone, offset = StopChecker(decode, set(), ("so on",), 60), StopChecker(decode, set(), ("so on",), 60)
    for n in range(1, len(generated) + 1):
        a, b = alone.update(generated[:n]), offset.update(prompt + generated[:n], len(prompt))
        assert (a, alone.text, alone.visible_chars) == (b, offset.text, offset.visible_chars), f"after {n} ids"
        if a:
            break
    assert a == "stop" and offset.text == decode(generated[:n]).split("so on")[0]
