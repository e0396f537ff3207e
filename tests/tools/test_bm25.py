"""Embedded BM25 retriever: hand-computed scores, ranking, on-disk index cache, thread safety."""

import concurrent.futures
import json
import math
import os
import subprocess
import sys

import pytest

from atpo_jax.tools import BM25Params, CorpusError, LocalBM25Retriever, write_corpus
from atpo_jax.tools.bm25 import import_bm25s

ROWS = [
    {"id": "d0", "contents": "apple banana"},
    {"id": "d1", "contents": "apple apple cherry"},
    {"id": "d2", "contents": "cherry date"},
]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    write_corpus(ROWS, path)
    return path


def lucene_bm25(tf, doc_len, df, n_docs=3, avg_len=7 / 3, k1=1.5, b=0.75):
    idf = math.log(1 + (n_docs - df + 0.5) / (df + 0.5))
    return idf * tf / (k1 * ((1 - b) + b * doc_len / avg_len) + tf)


def test_scores_match_the_lucene_formula(corpus):
    retriever = LocalBM25Retriever(corpus)
    [hits] = retriever.search(["apple"], topk=3)
    # "apple": df = 2 of N = 3; d1 has tf 2 in 3 tokens, d0 tf 1 in 2 tokens; avg length 7/3.
    assert [h.id for h in hits] == ["d1", "d0"]
    assert hits[0].score == pytest.approx(lucene_bm25(tf=2, doc_len=3, df=2), rel=1e-5)
    assert hits[1].score == pytest.approx(lucene_bm25(tf=1, doc_len=2, df=2), rel=1e-5)
    assert hits[0].score == pytest.approx(0.245983, rel=1e-4)  # ln(1.6) * 2 / 3.821429
    assert hits[0].document == ROWS[1]


def test_multi_term_query_sums_terms_and_topk_cuts(corpus):
    retriever = LocalBM25Retriever(corpus)
    [hits] = retriever.search(["Cherry DATE"], topk=1)
    assert [h.id for h in hits] == ["d2"]
    expected = lucene_bm25(tf=1, doc_len=2, df=2) + lucene_bm25(tf=1, doc_len=2, df=1)
    assert hits[0].score == pytest.approx(expected, rel=1e-5)


def test_no_match_stopwords_and_batch(corpus):
    retriever = LocalBM25Retriever(corpus)
    results = retriever.search(["zebra", "the of", "", "banana"], topk=3)
    assert [[h.id for h in r] for r in results] == [[], [], [], ["d0"]]


def test_ties_are_broken_by_corpus_order(tmp_path):
    path = tmp_path / "tied.jsonl"
    write_corpus([{"id": str(i), "contents": "same words here"} for i in range(5)], path)
    [hits] = LocalBM25Retriever(path).search(["words"], topk=3)
    assert [h.id for h in hits] == ["0", "1", "2"]


def test_index_is_cached_and_reused(corpus, tmp_path, monkeypatch):
    index_dir = tmp_path / "index"
    first = LocalBM25Retriever(corpus, index_dir=index_dir)
    assert os.path.isdir(first.index_path) and os.path.dirname(first.index_path) == str(index_dir)
    bm25s = import_bm25s()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached index should have been loaded")

    monkeypatch.setattr(bm25s.BM25, "index", no_rebuild)
    second = LocalBM25Retriever(corpus, index_dir=index_dir)
    assert second.index_path == first.index_path
    assert second.search(["apple"], 3) == first.search(["apple"], 3)


def test_changed_corpus_or_params_get_a_new_index(corpus, tmp_path):
    index_dir = tmp_path / "index"
    a = LocalBM25Retriever(corpus, index_dir=index_dir)
    b = LocalBM25Retriever(corpus, index_dir=index_dir, params=BM25Params(k1=0.9))
    write_corpus([*ROWS, {"id": "d3", "contents": "elderberry"}], corpus)
    c = LocalBM25Retriever(corpus, index_dir=index_dir)
    assert len({a.index_path, b.index_path, c.index_path}) == 3
    assert [h.id for h in c.search(["elderberry"], 3)[0]] == ["d3"]
    assert sorted(os.listdir(index_dir)) == sorted(
        os.path.basename(p) for p in (a.index_path, b.index_path, c.index_path)
    )


def test_default_index_dir_is_next_to_the_corpus(corpus):
    retriever = LocalBM25Retriever(corpus)
    assert retriever.index_path.startswith(str(corpus) + ".bm25s" + os.sep)


def test_concurrent_searches_match_sequential(corpus):
    retriever = LocalBM25Retriever(corpus)
    queries = ["apple", "cherry", "date", "banana apple", "nothing"] * 20
    expected = [retriever.search([q], 2)[0] for q in queries]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda q: retriever.search([q], 2)[0], queries))
    assert got == expected


def test_bad_topk(corpus):
    with pytest.raises(ValueError, match="topk"):
        LocalBM25Retriever(corpus).search(["apple"], 0)


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"id": 1, "contents": "ok"}\nnot json\n', r"line 2: not valid JSON"),
        ('{"id": 1}\n', r"line 1: missing string field 'contents'"),
        ('{"contents": "x"}\n', r"line 1: missing field 'id'"),
        ("[1, 2]\n", r"line 1: expected a JSON object"),
        ("\n\n", "has no rows"),
    ],
)
def test_malformed_corpus_names_file_and_line(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(CorpusError, match=match) as info:
        LocalBM25Retriever(path)
    assert str(path) in str(info.value)


def test_missing_corpus(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        LocalBM25Retriever(tmp_path / "nope.jsonl")


def test_tools_rewards_data_never_import_jax(corpus):
    # The no-JAX layers (DESIGN.md §1) must stay importable and usable without JAX, including bm25s,
    # which would otherwise import jax.lax and start a backend.
    code = (
        "import sys, json\n"
        "import atpo_jax.tools, atpo_jax.rewards, atpo_jax.data, atpo_jax.data.synthetic\n"
        "import atpo_jax.tools.retrieval_server\n"
        f"r = atpo_jax.tools.LocalBM25Retriever({str(corpus)!r})\n"
        "r.search(['apple'], 2)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_topk_selection_matches_a_full_sort(tmp_path):
    # Few distinct words -> many exactly tied scores; the fast top-k must equal sorting everything.
    import random

    rng = random.Random(0)
    words = ["ant", "bee", "cat", "dog", "eel"]
    rows = [
        {"id": str(i), "contents": " ".join(rng.choices(words, k=rng.randint(1, 4)))}
        for i in range(200)
    ]
    path = tmp_path / "ties.jsonl"
    write_corpus(rows, path)
    retriever = LocalBM25Retriever(path)
    for query in ("ant", "bee cat", "dog eel ant", "cat cat"):
        ids = [retriever._vocab[t] for t in retriever._tokenize([query])[0]]
        scores = retriever._model.get_scores_from_ids(ids)
        brute = sorted((i for i in range(200) if scores[i] > 0), key=lambda i: (-scores[i], i))
        for k in (1, 3, 10, 500):
            assert [int(h.id) for h in retriever.search([query], k)[0]] == brute[:k]


# --- corpus edge cases (issue 20, item 8) ------------------------------------------------------------


def test_non_utf8_corpus_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"id": "a", "contents": "ok"}\n{"id": "b", "contents": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match=f"{path} line 2: not UTF-8 text"):
        LocalBM25Retriever(path)


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"id": null, "contents": "x"}'], r"line 1: 'id' is null"),
        (
            ['{"id": "a", "contents": "x"}', '{"id": " ", "contents": "y"}'],
            r"line 2: 'id' is empty",
        ),
        (['{"id": true, "contents": "x"}'], r"line 1: 'id' must be a string or an integer"),
        (
            ['{"id": "a", "contents": "x"}', '{"id": "b", "contents": "y"}'] * 2,
            r"2 duplicate passage id\(s\): id 'a' on lines 1, 3; id 'b' on lines 2, 4",
        ),
        (  # the service returns ids as text, so 7 and "7" collide
            ['{"id": 7, "contents": "x"}', '{"id": "7", "contents": "y"}'],
            r"duplicate passage id\(s\): id '7' on lines 1, 2",
        ),
    ],
    ids=["null", "empty", "bool", "duplicates", "int-and-string"],
)
def test_bad_or_duplicate_ids_name_file_and_lines(tmp_path, lines, match):
    path = tmp_path / "ids.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError, match=match) as info:
        LocalBM25Retriever(path)
    assert str(path) in str(info.value)


def test_empty_passages_are_kept_with_one_warning(tmp_path, caplog):
    path = tmp_path / "gaps.jsonl"
    write_corpus([{"id": "0", "contents": ""}, *ROWS, {"id": "9", "contents": "  "}], path)
    with caplog.at_level("WARNING", logger="atpo_jax.tools.corpus"):
        retriever = LocalBM25Retriever(path)
    [warning] = [r.getMessage() for r in caplog.records if r.name == "atpo_jax.tools.corpus"]
    assert f"{path}: 2 of 5 passages have empty 'contents' (lines 1, 5)" in warning
    assert retriever.num_documents == 5
    assert sorted(h.id for h in retriever.search(["cherry"], 5)[0]) == ["d1", "d2"]


def test_a_corpus_of_empty_passages_is_an_error(tmp_path):
    path = tmp_path / "blank.jsonl"
    write_corpus([{"id": "0", "contents": ""}, {"id": "1", "contents": " \t"}], path)
    with pytest.raises(CorpusError, match=f"{path}: all 2 passages have empty 'contents'"):
        LocalBM25Retriever(path)


def test_an_all_stopword_corpus_is_an_error(tmp_path):
    path = tmp_path / "stopwords.jsonl"
    write_corpus([{"id": "0", "contents": "the of and"}, {"id": "1", "contents": "is a"}], path)
    with pytest.raises(CorpusError, match=r"no passage has a word BM25 can index.*stopwords='en'"):
        LocalBM25Retriever(path)


def test_an_unwritable_default_index_folder_falls_back_to_memory(corpus, caplog):
    # A file where the folder should be stands in for a read-only mount (tests may run as root,
    # who can write anywhere chmod allows nothing).
    blocked = str(corpus) + ".bm25s"
    with open(blocked, "w") as f:
        f.write("not a folder")
    with caplog.at_level("WARNING", logger="atpo_jax.tools.bm25"):
        retriever = LocalBM25Retriever(corpus)
    assert [h.id for h in retriever.search(["apple"], 3)[0]] == ["d1", "d0"]
    [warning] = [r.getMessage() for r in caplog.records if r.name == "atpo_jax.tools.bm25"]
    assert f"BM25 index folder {blocked!r} cannot be written" in warning
    assert "stays in memory" in warning and "--index-dir" in warning


def test_an_unwritable_explicit_index_folder_is_an_error(corpus, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CorpusError, match=r"BM25 index folder .*file/index.* cannot be written"):
        LocalBM25Retriever(corpus, index_dir=blocker / "index")

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkdtemp", read_only)
    with pytest.raises(
        CorpusError, match=r"\(Permission denied\): pass a writable one .*--index-dir"
    ):
        LocalBM25Retriever(corpus, index_dir=tmp_path / "ro")
