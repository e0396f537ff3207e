"""The synthetic generator's named worlds (easy, ambiguous, long, noisy, mixed): the easy world's files
are pinned byte for byte; every harder world's questions are answerable in exactly their hop count
through the real BM25 search; the scripted expert scores EM 1.0 (re-querying under retrieval noise);
and the namesakes and the noise do what they say, measured on the generated data."""

import collections
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from atpo_jax.data import read_rows
from atpo_jax.data.synthetic import (
    LONG_TEMPLATES,
    SPLITS,
    WORLDS,
    ExpertAgent,
    SyntheticWorldConfig,
    SyntheticWorldFiles,
    build_synthetic_world,
    entity_queries,
    parse_question_full,
    play_episode,
    read_manifest,
    world_retriever,
)
from atpo_jax.data.synthetic.world import ALL_RELATIONS
from atpo_jax.rewards import compute_reward
from atpo_jax.tools import LocalBM25Retriever, NoisyRetriever, SearchTool, Toolbox

# sha256 of every file the default build (build_synthetic_world(dir), SyntheticWorldConfig()) wrote
# with the generator as it was before the harder worlds were added (commit 003f3f7, recorded by
# building it into a scratch folder). They pin the requirement that the easy world stays byte-identical.
EASY_SHA256 = {
    "corpus.jsonl": "a3b2185593ba836edb0c3c9e5100ed35a2b073a9fcd9ad81e24883c4a2932e8f",
    "demos.jsonl": "d10bda74dc08eca25aa1a4f85e105e1c3f1d66a3cbb8ea265580a90c740a5743",
    "manifest.json": "7f745cd9755e6043159d1d0202086b39c45160cf59f6e9eead4181f8251e7555",
    "test.parquet": "e662e2027b1af6a86c1025a593b3f99b38b6370fa119fb44d8c36ea68b427f65",
    "tokenizer/special_tokens_map.json": "139726470f11c4c931bc5f11e60bccb7adc81237c333dd9cf75bed5e0586f978",
    "tokenizer/tokenizer.json": "5804c9ff9f57f8a2539d2e7ab1217509d0d1133909c3e6378f43e0939d2defeb",
    "tokenizer/tokenizer_config.json": "c8a9e0b9f4b79af45a40236c3fa4ab01fdee4c9764ea6a2f6c038e5e3603d0f5",
    "train.parquet": "358c5dd7c6c84709c3887aa8e91194db66b4c95dbcc90ff7c1c8b3afcc10f306",
    "validation.parquet": "afd2f0e877848b794dbc5b71d64523abab3c7ecaa627db299a350666d396a4d3",
    "world.json": "f46d4bc83313fef284b0b5cde612dad31c7d093da048ff985b4e6ebad6951a45",
}

HARDER = ("ambiguous", "long", "noisy", "mixed")
TOPK = 3
# Small worlds keep the file fast; big enough for several namesake groups and a few hundred questions.
SIZE = {"num_countries": 5, "cities_per_country": 3, "num_people": 64, "num_companies": 48}


def _sha256_tree(root):
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root).replace(os.sep, "/")] = hashlib.sha256(
                    f.read()
                ).hexdigest()
    return out


def test_easy_world_is_byte_identical_to_the_pre_change_generator(world_files, tmp_path):
    assert SyntheticWorldConfig(world="easy") == SyntheticWorldConfig()
    assert not SyntheticWorldConfig().harder
    assert _sha256_tree(world_files.root) == EASY_SHA256  # conftest: the default build
    again = build_synthetic_world(tmp_path / "easy", SyntheticWorldConfig(world="easy"))
    assert _sha256_tree(again.root) == EASY_SHA256


def test_world_settings_are_validated_and_recorded():
    assert set(WORLDS) == {"easy", "ambiguous", "long", "noisy", "mixed"}
    assert all(w.mechanism for w in WORLDS.values())
    with pytest.raises(ValueError, match=r"data\.synthetic\.world='hard' is not one of easy"):
        SyntheticWorldConfig(world="hard")
    with pytest.raises(ValueError, match=r"data\.synthetic\.max_hops=6 must be 3, 4 or 5"):
        SyntheticWorldConfig(max_hops=6)
    with pytest.raises(ValueError, match=r"data\.synthetic\.retrieval_noise=1\.0"):
        SyntheticWorldConfig(world="noisy", retrieval_noise=1.0)
    with pytest.raises(ValueError, match=r"data\.synthetic\.namesake_size=9"):
        SyntheticWorldConfig(namesake_size=9)
    noisy = SyntheticWorldConfig(world="noisy")
    assert (noisy.retrieval_noise, noisy.distractor_share, noisy.max_hops) == (0.25, 0.5, 3)
    assert SyntheticWorldConfig(world="noisy", retrieval_noise=0.05).retrieval_noise == 0.05
    long = SyntheticWorldConfig(world="long")
    assert (long.max_hops, long.namesakes_mid_chain_only) == (5, True)
    # The easy config's JSON (the manifest's) has no world keys; a harder one records its knobs.
    assert "world" not in SyntheticWorldConfig().to_json()
    recorded = noisy.to_json()
    assert (recorded["world"], recorded["retrieval_noise"], recorded["distractor_share"]) == (
        "noisy",
        0.25,
        0.5,
    )
    assert "max_hops" not in recorded


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """Each harder world, built small: files, rows, entities by key, noise-free BM25."""
    out = {}
    for name in HARDER:
        root = tmp_path_factory.mktemp(name)
        files = build_synthetic_world(root, SyntheticWorldConfig(world=name, **SIZE), topk=TOPK)
        with open(files.world) as f:
            entities = json.load(f)
        by_key = {
            (f"{e['name']}~{e['occupation']}" if e.get("namesake") else e["name"]): e
            for e in entities
        }
        out[name] = {
            "files": files,
            "config": SyntheticWorldConfig(world=name, **SIZE),
            "rows": [row for split in SPLITS for row in read_rows(files.split(split))],
            "entities": entities,
            "by_key": by_key,
            "retriever": LocalBM25Retriever(files.corpus, index_dir=root / "index"),
        }
    return out


def _key(name, attribute):
    return name if attribute is None else f"{name}~{attribute}"


def _is_page_of(contents, name, attribute):
    title, _, text = contents.partition("\n")
    if title != f'"{name}"':
        return False
    return attribute is None or f"{name} is a {attribute}." in text


@pytest.mark.parametrize("name", HARDER)
def test_every_question_needs_exactly_its_hops_through_real_bm25(worlds, name):
    w = worlds[name]
    rows, by_key, retriever = w["rows"], w["by_key"], w["retriever"]
    assert len(rows) > 100
    for row in rows:
        info = row.extra_info
        assert info["world"] == name and row.data_source == f"synthetic_{info['hops']}hop"
        template, subject, attribute = parse_question_full(info["question"])
        chain, attributes = info["chain"], info["attributes"]
        assert (subject, attribute) == (chain[0], attributes[0]) and template.hops == info["hops"]
        assert row.golds == [chain[-1]] and chain[-1] not in info["question"]
        for hop, relation in enumerate(template.relations):
            here, there = (
                _key(chain[hop], attributes[hop]),
                _key(chain[hop + 1], attributes[hop + 1]),
            )
            assert by_key[here]["facts"][relation] == there  # the world's fact, from world.json
            # The careful query (the name, qualified for a namesake) has the right page in its top k.
            hits = retriever.search(
                [entity_queries(chain[hop], attributes[hop], relation)[0]], TOPK
            )[0]
            own = [h for h in hits if _is_page_of(h.contents, chain[hop], attributes[hop])]
            assert len(own) == 1, (info["question"], hop)
            shown = (
                chain[hop + 1]
                if attributes[hop + 1] is None
                else (f"the {attributes[hop + 1]} {chain[hop + 1]}")
            )
            assert f"{chain[hop]} {ALL_RELATIONS[relation].phrase} {shown}." in own[0].contents
            if hop < len(chain) - 2:  # no earlier search shows the answer
                answer = re.compile(rf"\b{re.escape(chain[-1])}\b")
                assert not any(answer.search(h.contents) for h in hits), (info["question"], hop)


@pytest.mark.parametrize("name", HARDER)
def test_expert_scores_em_one_through_the_worlds_tools(worlds, name):
    w = worlds[name]
    clean = Toolbox([SearchTool(w["retriever"], topk=TOPK)])
    world_search = world_retriever(w["files"], index_dir=w["files"].root + "-index")
    noisy = Toolbox([SearchTool(world_search, topk=TOPK)])
    assert isinstance(world_search, NoisyRetriever) == (w["config"].retrieval_noise > 0)
    requeried = 0
    for row in w["rows"]:
        question, hops = row.extra_info["question"], row.extra_info["hops"]
        episode = play_episode(ExpertAgent(question), clean)
        assert episode.ended_by == "answer" and episode.num_calls == hops
        assert compute_reward(episode.response, row.golds).em == 1.0, question
        episode = play_episode(ExpertAgent(question), noisy)
        assert episode.ended_by == "answer"
        assert compute_reward(episode.response, row.golds).em == 1.0, question
        if isinstance(world_search, NoisyRetriever):
            # Every query that missed (by the retriever's own seeded draw) was followed by a re-query.
            queries = re.findall(r"<search> (.*?) </search>", episode.response)
            assert len(queries) == episode.num_calls
            assert episode.num_calls == hops + sum(map(world_search.misses, queries))
        requeried += episode.num_calls > hops
    if w["config"].retrieval_noise > 0:
        assert requeried > 0
    else:
        assert requeried == 0


def _namesakes(entities):
    groups = collections.defaultdict(list)
    for e in entities:
        if e.get("namesake"):
            groups[e["name"]].append(e["occupation"])
    return groups


@pytest.mark.parametrize("name", ["ambiguous", "long", "mixed"])
def test_a_bare_name_leads_astray_and_the_qualified_query_does_not(worlds, name):
    w = worlds[name]
    retriever, size = w["retriever"], w["config"].namesake_size
    groups = _namesakes(w["entities"])
    assert len(groups) >= 3 and all(len(set(occ)) == len(occ) == size for occ in groups.values())
    wrong_top1 = absent = right_qualified = total = 0
    for person, occupations in groups.items():
        for occupation in occupations:
            total += 1
            bare = retriever.search([person], TOPK)[0]
            wrong_top1 += not _is_page_of(bare[0].contents, person, occupation)
            absent += not any(_is_page_of(h.contents, person, occupation) for h in bare)
            qualified = retriever.search([f"{person} {occupation}"], TOPK)[0]
            right_qualified += _is_page_of(qualified[0].contents, person, occupation)
    # Namesakes' pages tie for the bare name, so its top 1 is one of the `size` namesakes and its top
    # k holds k of them: the top 1 is another person's page for (size-1)/size of the namesakes, and
    # the right page is missing from the top k for (size-k)/size of them.
    assert wrong_top1 / total == pytest.approx((size - 1) / size, abs=0.05)
    assert absent / total == pytest.approx(max(size - TOPK, 0) / size, abs=0.05)
    assert right_qualified == total

    # On the questions: an expert that drops the qualifier goes astray at the decisive turn.
    class Careless(ExpertAgent):
        def _query(self):
            self.attributes[-1] = None
            return super()._query()

    clean = Toolbox([SearchTool(retriever, topk=TOPK)])
    decisive = [r for r in w["rows"] if r.extra_info["decisive_hop"] is not None]
    assert len(decisive) >= 30
    careless_em = []
    for row in decisive:
        episode = play_episode(Careless(row.extra_info["question"]), clean, max_turns=8)
        careless_em.append(compute_reward(episode.response, row.golds).em)
    assert sum(careless_em) / len(careless_em) <= 0.5


def test_long_world_has_chains_up_to_five_hops_with_a_decisive_middle_turn(worlds):
    w = worlds["long"]
    rows = w["rows"]
    hops = collections.Counter(r.extra_info["hops"] for r in rows)
    stats = read_manifest(w["files"])["stats"]["questions"]
    assert {f"{h}hop": sum(stats[s][f"{h}hop"] for s in SPLITS) for h in range(1, 6)} == {
        f"{h}hop": hops[h] for h in range(1, 6)
    }
    assert max(hops) == 5 and all(hops[h] >= 10 for h in range(1, 6))
    assert {r.extra_info["template"] for r in rows if r.extra_info["hops"] >= 4} == {
        t.key for t in LONG_TEMPLATES
    }
    # Namesakes only in the middle: no question asks about one, and the decisive turn is the
    # founder's search, never the first; the 5-hop employer chains put it in the exact middle.
    decisive = [r.extra_info for r in rows if r.extra_info["decisive_hop"] is not None]
    assert all(info["attributes"][0] is None for info in (r.extra_info for r in rows))
    assert decisive and all(info["decisive_hop"] > 0 for info in decisive)
    middle = [
        info
        for info in decisive
        if info["template"] == "employer_founder_capital" and info["decisive_hop"] == 2
    ]
    assert len(middle) >= 5
    for info in decisive:
        hop = info["decisive_hop"]
        assert info["attributes"][hop] is not None and all(
            a is None for a in info["attributes"][:hop]
        )


@pytest.mark.parametrize("name", ["noisy", "mixed"])
def test_retrieval_noise_misses_at_its_configured_rate(worlds, name):
    w = worlds[name]
    rate = w["config"].retrieval_noise
    base = w["retriever"]
    noisy = world_retriever(w["files"], index_dir=w["files"].root + "-index")
    assert read_manifest(w["files"])["world"]["retrieval"] == {
        "miss_rate": rate,
        "seed": w["config"].seed,
    }
    # Every query the expert can make for any entity of the world.
    queries = sorted(
        {
            q
            for e in w["entities"]
            if e["kind"] != "note"
            for relation in ALL_RELATIONS
            for q in entity_queries(
                e["name"], e.get("occupation") if e.get("namesake") else None, relation
            )
        }
    )
    assert len(queries) > 1000
    missed = counted = 0
    for query in queries:
        best = base.search([query], TOPK + 1)[0]
        got = noisy.search([query], TOPK)[0]
        assert noisy.search([query], TOPK)[0] == got  # deterministic per query
        # Either the base top k, or the best page dropped and the next one moved up.
        assert got == best[:TOPK] or got == best[1 : TOPK + 1]
        if best:
            counted += 1
            missed += best[0].id not in {p.id for p in got}
    # Over the queries with a best page to miss: a binomial share, within 4 standard deviations.
    assert counted > 1000
    sigma = (rate * (1 - rate) / counted) ** 0.5
    assert abs(missed / counted - rate) < 4 * sigma
    # The noisy world has distractor notes, each naming an entity in a relation no template asks.
    notes = [e for e in w["entities"] if e["kind"] == "note"]
    non_notes = len(w["entities"]) - len(notes)
    assert abs(len(notes) / non_notes - w["config"].distractor_share) < 0.1
    phrases = {r.phrase for r in ALL_RELATIONS.values()}
    for note in notes:
        ((subject, phrase, obj),) = note["mentions"]
        assert phrase not in phrases and subject != obj


def test_cli_builds_a_named_world(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "atpo_jax.data.synthetic",
            "--out",
            str(tmp_path / "cli"),
            "--world",
            "long",
            "--num-people",
            "24",
            "--num-companies",
            "16",
            "--num-countries",
            "3",
            "--cities-per-country",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    manifest = read_manifest(SyntheticWorldFiles(str(tmp_path / "cli")))
    assert manifest["world"]["name"] == "long"
    assert manifest["world"]["mechanism"] == WORLDS["long"].mechanism
    assert manifest["config"]["max_hops"] == 5 and manifest["config"]["world"] == "long"
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "atpo_jax.data.synthetic",
            "--out",
            str(tmp_path / "x"),
            "--world",
            "hard",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "invalid choice: 'hard'" in bad.stderr
