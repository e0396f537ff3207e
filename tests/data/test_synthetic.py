"""The synthetic multi-hop world: determinism, structure, strict multi-hop answerability via BM25 top-3,
a perfect scripted expert through the real tools and reward, noisy demonstrations, and the tokenizer."""

import collections
import dataclasses
import filecmp
import json
import os
import re
import subprocess
import sys

import pytest

from atpo_jax.data import encode_transcript, read_rows
from atpo_jax.data.synthetic import (
    SPLITS,
    ExpertAgent,
    SyntheticWorldConfig,
    build_synthetic_world,
    demo_segments,
    parse_question,
    play_episode,
    read_demos,
    read_manifest,
)
from atpo_jax.data.synthetic import build as build_module
from atpo_jax.rewards import compute_reward, validate_format
from atpo_jax.tools import LocalBM25Retriever, SearchTool, Toolbox

TAG_TOKENS = [
    "<think>",
    "</think>",
    "<search>",
    "</search>",
    "<result>",
    "</result>",
    "<answer>",
    "</answer>",
    "\\boxed{",
]


@pytest.fixture(scope="module")
def world(world_files):
    with open(world_files.world) as f:
        return {e["name"]: e for e in json.load(f)}


@pytest.fixture(scope="module")
def retriever(world_files, tmp_path_factory):
    return LocalBM25Retriever(world_files.corpus, index_dir=tmp_path_factory.mktemp("index"))


@pytest.fixture(scope="module")
def all_rows(world_files):
    return {split: read_rows(world_files.split(split)) for split in SPLITS}


def _tree_files(root):
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
    )


def test_same_seed_gives_byte_identical_files(world_files, tmp_path):
    again = build_synthetic_world(tmp_path / "again")
    names = _tree_files(world_files.root)
    assert names == _tree_files(again.root)
    match, mismatch, errors = filecmp.cmpfiles(world_files.root, again.root, names, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(names) == 10


def test_other_seed_gives_another_world(world_files, tmp_path):
    other = build_synthetic_world(
        tmp_path / "other", SyntheticWorldConfig(seed=1, num_people=20, num_companies=10)
    )
    with open(world_files.corpus) as a, open(other.corpus) as b:
        assert a.read() != b.read()


def test_existing_world_is_reused(world_files, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("should not rebuild")

    monkeypatch.setattr(build_module, "generate_world", fail)
    assert build_synthetic_world(world_files.root) == world_files
    with pytest.raises(AssertionError, match="should not rebuild"):
        build_synthetic_world(world_files.root, overwrite=True)


def test_world_structure(world):
    kinds = collections.Counter(e["kind"] for e in world.values())
    assert kinds == {"country": 8, "city": 32, "person": 160, "company": 120}
    assert len({n.lower() for n in world}) == len(world)
    for e in world.values():
        if e["kind"] == "company":
            founder_city = world[e["facts"]["founded_by"]]["facts"]["born_in"]
            assert e["facts"]["based_in"] != founder_city
        if e["kind"] == "country":
            assert world[e["facts"]["capital"]]["facts"]["located_in"] == e["name"]


def test_passages_are_short_wiki18_rows(world_files):
    with open(world_files.corpus) as f:
        rows = [json.loads(line) for line in f]
    assert [r["id"] for r in rows] == [str(i) for i in range(len(rows))]
    for row in rows:
        title, _, text = row["contents"].partition("\n")
        assert re.fullmatch(r'"[A-Z][a-z]+"', title) and text.startswith(title.strip('"') + " ")
        assert len(row["contents"].split()) <= 40


def test_splits_hold_out_subjects(all_rows, world_files):
    subjects = {s: {r.extra_info["chain"][0] for r in rows} for s, rows in all_rows.items()}
    assert not subjects["train"] & subjects["validation"]
    assert not subjects["train"] & subjects["test"]
    assert not subjects["validation"] & subjects["test"]
    stats = read_manifest(world_files)["stats"]["questions"]
    for split, rows in all_rows.items():
        hops = collections.Counter(r.extra_info["hops"] for r in rows)
        assert {f"{h}hop": hops[h] for h in (1, 2, 3)} | {"total": len(rows)} == stats[split]
        assert min(hops.values()) >= 20
        for row in rows:
            assert row.data_source == f"synthetic_{row.extra_info['hops']}hop"
            assert row.golds == [row.extra_info["chain"][-1]]
            template, subject = parse_question(row.extra_info["question"])
            assert subject == row.extra_info["chain"][0] and template.hops == row.extra_info["hops"]
            assert row.prompt[0]["role"] == "system" and row.prompt[0]["content"].endswith(
                "\nuser\n" + row.extra_info["question"]
            )


def test_every_question_needs_exactly_its_hops_via_bm25_top3(all_rows, world, retriever):
    checked = 0
    for rows in all_rows.values():
        for row in rows:
            chain, answer = row.extra_info["chain"], row.golds[0]
            template, _ = parse_question(row.extra_info["question"])
            assert answer not in row.extra_info["question"]
            for hop, (entity, relation) in enumerate(
                zip(chain[:-1], template.relations, strict=True)
            ):
                hits = retriever.search([entity], 3)[0]
                own = [h for h in hits if h.contents.startswith(f'"{entity}"\n')]
                # The entity's own page is retrieved, and it states the link to the next entity.
                assert len(own) == 1, (row.extra_info["question"], entity)
                assert world[entity]["facts"][relation] == chain[hop + 1]
                phrase = build_module.RELATIONS[relation].phrase
                assert f"{entity} {phrase} {chain[hop + 1]}." in own[0].contents
                # No search before the last one shows the answer anywhere in its top 3.
                if hop < len(chain) - 2:
                    assert all(answer not in h.contents for h in hits), (
                        row.extra_info["question"],
                        hop,
                    )
            checked += 1
    assert checked == sum(len(r) for r in all_rows.values()) > 1000


class DecodedAgent:
    """Passes each turn through the tokenizer, as if the model had generated those tokens."""

    def __init__(self, inner, tokenizer):
        self.inner, self.tokenizer = inner, tokenizer

    def act(self, observation):
        turn = self.inner.act(observation)
        ids = self.tokenizer.encode(turn, add_special_tokens=False)
        decoded = self.tokenizer.decode(ids, skip_special_tokens=True)
        assert decoded == turn.strip()  # canonical spacing round-trips exactly
        return decoded


def test_scripted_expert_scores_em_one_through_real_tools(all_rows, retriever, world_tokenizer):
    toolbox = Toolbox([SearchTool(retriever, topk=3)])
    for split, rows in all_rows.items():
        for row in rows:
            agent = DecodedAgent(ExpertAgent(row.extra_info["question"]), world_tokenizer)
            episode = play_episode(agent, toolbox)
            assert episode.ended_by == "answer" and episode.num_calls == row.extra_info["hops"]
            reward = compute_reward(episode.response, row.golds)
            assert (reward.score, reward.em) == (1.0, 1.0), (
                split,
                row.extra_info["question"],
                reward,
            )
            assert compute_reward(episode.response, row.golds, validate=True).em == 1.0
            enc = encode_transcript(world_tokenizer, row.prompt, list(episode.segments))
            assert len(enc.prompt_ids) <= 60 and len(enc.response_ids) <= 250
            assert world_tokenizer.unk_token_id not in enc.prompt_ids + enc.response_ids


def test_demonstrations_are_noisy_in_a_controlled_way(world_files, all_rows, world_tokenizer):
    demos = read_demos(world_files.demos)
    config = SyntheticWorldConfig()
    train = all_rows["train"]
    assert len(demos) == len(train)
    kinds = collections.Counter(d["mistake"] for d in demos)
    share = 1 - kinds[None] / len(demos)
    assert abs(share - config.demo_mistake_rate) < 0.06
    assert set(kinds) == {None, "wrong_search", "early_answer", "wrong_answer"}
    for demo, row in zip(demos, train, strict=True):
        assert demo["question"] == row.extra_info["question"] and demo["golds"] == row.golds
        assert demo["prompt"] == row.prompt
        segments = demo_segments(demo)
        response = "".join(s.text for s in segments)
        assert validate_format(response).ok  # mistakes are wrong content, never broken format
        assert [s.trainable for s in segments][::2] == [True] * ((len(segments) + 1) // 2)
        assert not any(s.trainable for s in segments[1::2])
        expected_em = 0.0 if demo["mistake"] in ("early_answer", "wrong_answer") else 1.0
        assert demo["em"] == demo["reward"] == expected_em
        extra_calls = 1 if demo["mistake"] == "wrong_search" else 0
        if demo["mistake"] in (None, "wrong_search"):
            assert demo["num_calls"] == demo["hops"] + extra_calls
        enc = encode_transcript(world_tokenizer, demo["prompt"], segments)
        assert world_tokenizer.unk_token_id not in enc.response_ids
    demo_em = sum(d["em"] for d in demos) / len(demos)
    assert read_manifest(world_files)["stats"]["demo_em"] == pytest.approx(demo_em, abs=1e-4)
    expected = 1 - config.demo_mistake_rate * (0.3 + 0.3)  # early_answer + wrong_answer weights
    assert demo_em == pytest.approx(expected, abs=0.05)


def test_word_tokenizer(world_files, world_tokenizer, world):
    tok = world_tokenizer
    assert (tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_end|>",
        "<|endoftext|>",
        "<|unk|>",
    )
    assert tok.pad_token_id == 0 and tok.bos_token is None
    assert tok.convert_ids_to_tokens(tok.convert_tokens_to_ids(["<|im_start|>"])) == [
        "<|im_start|>"
    ]
    assert 300 < len(tok) < 2000
    for tag in TAG_TOKENS:
        assert len(tok.encode(tag, add_special_tokens=False)) == 1, tag
    for name in world:
        assert tok.convert_ids_to_tokens(tok.encode(f" {name} ", add_special_tokens=False)) == [
            name
        ]
    kept = tok.decode(
        tok.encode("<think> I </think> <|im_end|>", add_special_tokens=False),
        skip_special_tokens=True,
    )
    assert kept == "<think> I </think>"  # tags are not special tokens
    with open(os.path.join(world_files.tokenizer, "tokenizer_config.json")) as f:
        config = json.load(f)
    assert (
        config["tokenizer_class"] == "PreTrainedTokenizerFast"
        and "<|im_start|>" in config["chat_template"]
    )


def test_tokenizer_survives_save_pretrained(world_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    world_tokenizer.save_pretrained(tmp_path / "copy")
    copy = AutoTokenizer.from_pretrained(tmp_path / "copy", local_files_only=True)
    messages = [{"role": "system", "content": "Who founded Foo?"}]
    text = "<think> a </think> <search> b </search>"
    assert copy.encode(text) == world_tokenizer.encode(text)
    assert copy.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        world_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    )
    assert (copy.eos_token_id, copy.pad_token_id, len(copy)) == (
        world_tokenizer.eos_token_id,
        world_tokenizer.pad_token_id,
        len(world_tokenizer),
    )


def test_paper_prompt_style_fits_the_vocabulary(tmp_path):
    files = build_synthetic_world(
        tmp_path / "paper",
        SyntheticWorldConfig(
            prompt_style="paper",
            num_people=12,
            num_companies=6,
            num_countries=3,
            cities_per_country=2,
        ),
    )
    from atpo_jax.data.synthetic import load_tokenizer

    tok = load_tokenizer(files.tokenizer)
    for row in read_rows(files.train):
        ids = encode_transcript(tok, row.prompt, []).prompt_ids
        assert tok.unk_token_id not in ids and len(ids) < 260


def test_bad_config_and_cli(tmp_path):
    with pytest.raises(ValueError, match="prompt_style"):
        SyntheticWorldConfig(prompt_style="long")
    with pytest.raises(ValueError, match="num_countries >= 2"):
        build_synthetic_world(tmp_path / "x", SyntheticWorldConfig(num_countries=1))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "atpo_jax.data.synthetic",
            "--out",
            str(tmp_path / "cli"),
            "--num-people",
            "10",
            "--num-companies",
            "5",
            "--num-countries",
            "2",
            "--cities-per-country",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout[: out.stdout.rindex("}") + 1])
    assert stats["questions"]["train"]["total"] > 0
    manifest = read_manifest(build_module.SyntheticWorldFiles(str(tmp_path / "cli")))
    expected = dataclasses.asdict(
        SyntheticWorldConfig(num_people=10, num_companies=5, num_countries=2, cities_per_country=2)
    ) | {"demo_mistake_weights": [0.4, 0.3, 0.3]}
    # The easy world's manifest records no world settings (as before they existed).
    for name in ("world", *build_module.EASY_KNOBS):
        del expected[name]
    assert manifest["config"] == expected
