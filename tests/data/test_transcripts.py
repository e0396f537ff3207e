"""Segments -> token ids and loss mask, each segment tokenized on its own."""

from atpo_jax.data import Segment, build_messages, encode_prompt, encode_transcript, response_text


def test_encode_transcript_masks_observations(world_tokenizer):
    tok = world_tokenizer
    messages = build_messages("Who founded Foo?", "short")
    segments = [
        Segment("<think> I will search Foo . </think> <search> Foo </search>", True),
        Segment(" <result>\nPage 1: Foo\n</result>", False),
        Segment(" <think> done </think> <answer> \\boxed{ Foo } </answer>", True),
    ]
    enc = encode_transcript(tok, messages, segments)
    assert enc.prompt_ids == encode_prompt(tok, messages)
    pieces = [tok.encode(s.text, add_special_tokens=False) for s in segments]
    assert enc.response_ids == [*pieces[0], *pieces[1], *pieces[2], tok.eos_token_id]
    assert enc.loss_mask == [1] * len(pieces[0]) + [0] * len(pieces[1]) + [1] * (len(pieces[2]) + 1)
    assert tok.convert_ids_to_tokens(pieces[1]) == [
        "<result>",
        "Page",
        "1",
        ":",
        "<|unk|>",
        "</result>",
    ]
    # "Foo" is not a word of the world: unknown words map to <|unk|> instead of failing.
    no_eos = encode_transcript(tok, messages, segments, append_eos=False)
    assert no_eos.response_ids == enc.response_ids[:-1]
    assert response_text(segments).startswith("<think> I will search Foo")
