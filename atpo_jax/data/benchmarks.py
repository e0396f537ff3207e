"""The paper's seven QA benchmarks (ALGORITHM.md §7, §10): names, Table-1 columns and groups.

A benchmark's ``name`` is three things at once, as in the reference: FlashRAG's dataset name
(``RUC-NLPIR/FlashRAG_datasets`` config, so the directory ``<src>/<name>/`` of a local copy), the
``data_source`` of its rows, and the key the evaluation groups questions by.
"""

from __future__ import annotations

import dataclasses

from atpo_jax.settings import StrEnum


class Hops(StrEnum):
    MULTI = "multi_hop"
    SINGLE = "single_hop"


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One benchmark.

    Attributes:
      name: FlashRAG's dataset name and the rows' ``data_source``.
      label: its column heading in the paper's Table 1.
      hops: the Table-1 group it is averaged in.
      trains: the reference trains on its ``train`` split (NQ and HotpotQA only).
    """

    name: str
    label: str
    hops: Hops
    trains: bool = False


# In Table 1's column order, which is also the reference merge scripts' concatenation order.
BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("hotpotqa", "HotpotQA", Hops.MULTI, trains=True),
    Benchmark("2wikimultihopqa", "2Wiki", Hops.MULTI),
    Benchmark("musique", "MuSiQue", Hops.MULTI),
    Benchmark("bamboogle", "Bamboogle", Hops.MULTI),
    Benchmark("nq", "NQ", Hops.SINGLE, trains=True),
    Benchmark("triviaqa", "TriviaQA", Hops.SINGLE),
    Benchmark("popqa", "PopQA", Hops.SINGLE),
)
BY_NAME: dict[str, Benchmark] = {b.name: b for b in BENCHMARKS}

# The Table-1 heading of each group's average, and the reference's merged test file of the group
# (``multihop_test_merge.py`` / ``singlehop_test_merge.py``).
GROUP_LABELS: dict[Hops, str] = {Hops.MULTI: "multi-hop avg", Hops.SINGLE: "single-hop avg"}
GROUP_TEST_FILES: dict[Hops, str] = {
    Hops.MULTI: "multihop_test.parquet",
    Hops.SINGLE: "singlehop_test.parquet",
}

# The reference evaluates on a benchmark's ``test`` split if FlashRAG has one, else ``dev``, else
# ``train`` (so dev for HotpotQA, 2Wiki and MuSiQue; test for the other four).
TEST_SPLIT_PREFERENCE = ("test", "dev", "train")


def group_members(hops: Hops) -> tuple[str, ...]:
    """The benchmark names of a Table-1 group, in column order."""
    return tuple(b.name for b in BENCHMARKS if b.hops == hops)
