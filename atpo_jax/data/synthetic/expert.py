"""A scripted expert for the synthetic world, and a text-level episode loop that runs any agent.

:class:`ExpertAgent` answers a synthetic question the way we want the model to: search the subject, read
the linked name off the result page, search that, ..., then answer with the last name. It really reads the
observations (it has no access to the world), so it only succeeds if the corpus, retriever and formatting
work. Optional scripted mistakes make the noisy demonstrations:

* ``"wrong_search"``: at one hop it searches a wrong name, sees that page, then searches the right one
  (one extra search, still correct);
* ``"early_answer"``: it answers an intermediate name (or guesses before searching) instead of finishing
  the chain (wrong);
* ``"wrong_answer"``: it follows the whole chain, then answers another name from the last result (wrong).

In the harder worlds it also queries a namesake with its occupation (``Dravon painter``: the
question gives the subject's, the page that links to a namesake gives the others'), reads a fact only
from the page of the right namesake, and when a result lacks the fact it needs (the retriever's
top-k missed the page) it re-queries with the relation's keyword (``Dravon born``, then
``born Dravon``): a different query, which a retriever with seeded per-query misses answers anew.

Turns are written in the tokenizer's canonical spacing (tokens separated by single spaces).

:func:`play_episode` drives an agent through the real tool code (:func:`atpo_jax.tools.decide_turn`, a
:class:`~atpo_jax.tools.Toolbox`, :func:`atpo_jax.tools.format_observation`) the way the tree rollout does,
and returns the transcript as segments.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence
from typing import Protocol

from atpo_jax.data.synthetic.questions import parse_question_full
from atpo_jax.data.synthetic.world import ALL_RELATIONS, OCCUPATIONS
from atpo_jax.data.transcripts import Segment
from atpo_jax.tools.parsing import DEFAULT_CALL_LIMIT, TurnAction, decide_turn, stop_tag
from atpo_jax.tools.passages import format_observation
from atpo_jax.tools.toolbox import Toolbox

MISTAKE_KINDS = ("wrong_search", "early_answer", "wrong_answer")
# The expert's fixed think sentences ("{}" = a name); the tokenizer vocabulary is built from these.
THINK_START = "I will search {} ."
THINK_RECOVER = "That is not it . I will search {} ."
THINK_GUESS = "I know the answer ."
THINK_SENTENCES = (THINK_START, THINK_RECOVER, THINK_GUESS)
_NAME = re.compile(r"\b[A-Z][a-z]+\b")
_PAGE = re.compile(r"(?m)^Page \d+: ")
# The word of each relation's phrase that a re-query adds (it occurs in the pages stating it).
RELATION_KEYWORDS = {
    "born_in": "born",
    "founded_by": "founded",
    "based_in": "based",
    "located_in": "city",
    "capital": "capital",
    "works_for": "works",
}


class Agent(Protocol):
    def act(self, observation: str | None) -> str:
        """The next turn, given the last tool result (None at the start or after a failed tool)."""
        ...


class ExpertError(RuntimeError):
    """The expert could not find the fact it needed in the search result."""


def read_fact(observation: str, subject: str, relation: str) -> str | None:
    """The object of ``<subject> <relation phrase> <object>`` in a result text, or None."""
    link = read_link(observation, subject, relation)
    return None if link is None else link[0]


def read_link(
    observation: str, subject: str, relation: str, attribute: str | None = None
) -> tuple[str, str | None] | None:
    """``(object name, object's occupation or None)`` of ``<subject> <relation phrase> <object>``
    in a result text (a namesake object reads ``the <occupation> <name>``), or None.

    With ``attribute``, only a page that also says ``<subject> is a <attribute>`` counts: the page
    of the right namesake, not another one of the same name."""
    phrase = r"\s+".join(map(re.escape, ALL_RELATIONS[relation].phrase.split()))
    occupations = "|".join(OCCUPATIONS)
    fact = re.compile(rf"\b{re.escape(subject)}\s+{phrase}\s+(?:the\s+({occupations})\s+)?(\w+)")
    pages = [observation]
    if attribute is not None:
        own = re.compile(rf"\b{re.escape(subject)}\s+is\s+a\s+{re.escape(attribute)}\b")
        pages = [p for p in _PAGE.split(observation) if own.search(p)]
    for page in pages:
        match = fact.search(page)
        if match:
            return match.group(2), match.group(1)
    return None


def entity_queries(name: str, attribute: str | None, relation: str) -> list[str]:
    """The expert's queries for an entity, in order: its name (with a namesake's occupation), then
    two re-queries with the keyword of the relation it needs (see the module docstring)."""
    base = name if attribute is None else f"{name} {attribute}"
    keyword = RELATION_KEYWORDS[relation]
    return [base, f"{base} {keyword}", f"{keyword} {base}"]


def answer_turn(think: str, answer: str, *, first: bool = False) -> str:
    """An answering turn in canonical spacing; turns after the first start with a space."""
    lead = "" if first else " "
    return f"{lead}<think> {think} </think> <answer> \\boxed{{ {answer} }} </answer>"


def search_turn(think: str, query: str, *, first: bool = False) -> str:
    lead = "" if first else " "
    return f"{lead}<think> {think} </think> <search> {query} </search>"


@dataclasses.dataclass
class ExpertAgent:
    """Scripted agent for one synthetic question.

    Args:
      question: the question text.
      mistake: None for a perfect expert, or one of :data:`MISTAKE_KINDS`.
      mistake_hop: where the mistake happens: the search (``wrong_search``) or answer (``early_answer``)
        that replaces step ``mistake_hop`` of the chain (0 = the first search); ignored by ``wrong_answer``.
      rng: picks the wrong names.
      wrong_names: names to pick from when no other name is at hand (e.g. all entity names).
      avoid: names a mistake must not pick (pass the gold answer, so a "mistake" is really wrong).
    """

    question: str
    mistake: str | None = None
    mistake_hop: int = 0
    rng: random.Random = dataclasses.field(default_factory=lambda: random.Random(0))
    wrong_names: Sequence[str] = ()
    avoid: Sequence[str] = ()

    def __post_init__(self) -> None:
        if self.mistake is not None and self.mistake not in MISTAKE_KINDS:
            raise ValueError(
                f"mistake must be None or one of {MISTAKE_KINDS}, got {self.mistake!r}"
            )
        template, subject, attribute = parse_question_full(self.question)
        self.relations = template.relations
        self.chain = [subject]  # names found so far
        self.attributes: list[str | None] = [attribute]  # a namesake's occupation, per name
        self.attempt = 0  # queries made for the current name (re-queries after a miss)
        self.searching_wrong = False
        self.started = False

    def _wrong_name(self, candidates: Sequence[str]) -> str:
        banned = set(self.chain) | set(self.avoid)
        pool = [n for n in dict.fromkeys(candidates) if n not in banned]
        pool = pool or [n for n in self.wrong_names if n not in banned]
        if not pool:
            raise ExpertError("no wrong name available for a scripted mistake")
        return self.rng.choice(pool)

    def _query(self) -> str | None:
        """The next query for the current name (None once the re-queries are used up)."""
        relation = self.relations[len(self.chain) - 1]
        queries = entity_queries(self.chain[-1], self.attributes[-1], relation)
        if self.attempt >= len(queries):
            return None
        self.attempt += 1
        return queries[self.attempt - 1]

    def act(self, observation: str | None) -> str:
        if not self.started:
            self.started = True
            if self.mistake == "early_answer" and self.mistake_hop == 0:
                return answer_turn(THINK_GUESS, self._wrong_name([]), first=True)
            if self.mistake == "wrong_search" and self.mistake_hop == 0:
                self.searching_wrong = True
                wrong = self._wrong_name([])
                return search_turn(THINK_START.format(wrong), wrong, first=True)
            query = self._query()
            return search_turn(THINK_START.format(query), query, first=True)
        if self.searching_wrong:
            self.searching_wrong = False
            query = self._query()
            return search_turn(THINK_RECOVER.format(query), query)
        if observation is None:
            raise ExpertError("the expert needs a search result to continue")
        current = self.chain[-1]
        relation = self.relations[len(self.chain) - 1]
        link = read_link(observation, current, relation, self.attributes[-1])
        if link is None:
            query = self._query()  # the page is not in the result: re-query
            if query is None:
                raise ExpertError(
                    f"no '{current} {ALL_RELATIONS[relation].phrase} ...' in the result:\n"
                    f"{observation}"
                )
            return search_turn(THINK_RECOVER.format(query), query)
        found, found_attribute = link
        self.chain.append(found)
        self.attributes.append(found_attribute)
        self.attempt = 0
        shown = found if found_attribute is None else f"the {found_attribute} {found}"
        fact = f"{current} {ALL_RELATIONS[relation].phrase} {shown} ."
        step = len(self.chain) - 1  # chain steps resolved so far
        if step == len(self.relations):
            answer = found
            if self.mistake == "wrong_answer":
                answer = self._wrong_name(_NAME.findall(observation))
            return answer_turn(fact, answer)
        if self.mistake == "early_answer" and self.mistake_hop == step:
            return answer_turn(fact, found)
        if self.mistake == "wrong_search" and self.mistake_hop == step:
            self.searching_wrong = True
            return search_turn(fact, self._wrong_name(_NAME.findall(observation)))
        query = self._query()
        return search_turn(fact, query)


@dataclasses.dataclass(frozen=True)
class Episode:
    segments: tuple[Segment, ...]
    num_calls: int
    ended_by: (
        str  # "answer" (turn ended without a tool call), "empty_call", "tool_failure", "max_turns"
    )

    @property
    def response(self) -> str:
        return "".join(s.text for s in self.segments)


def play_episode(
    agent: Agent,
    toolbox: Toolbox,
    *,
    call_limit: int = DEFAULT_CALL_LIMIT,
    max_turns: int = 16,
) -> Episode:
    """Runs ``agent`` until it stops calling tools, following ALGORITHM.md §1.3–§1.4 at the text level.

    A tool call's observation is appended as a non-trainable segment; a call over the limit appends the
    warning (non-trainable) and lets the agent continue; an empty call or a failed tool ends the episode.
    """
    segments: list[Segment] = []
    calls = 0
    observation: str | None = None
    for _ in range(max_turns):
        turn = agent.act(observation)
        segments.append(Segment(turn, trainable=True))
        tag = stop_tag(turn, toolbox.tags)
        decision = decide_turn(
            turn,
            None if tag is None else f"</{tag}>",
            tool_tags=toolbox.tags,
            calls_made=calls,
            call_limit=call_limit,
        )
        calls = decision.calls_made
        if decision.action is TurnAction.CALL:
            result = toolbox.run(decision.tag, decision.query)
            if not result.ok:
                return Episode(tuple(segments), calls, "tool_failure")
            segments.append(Segment(format_observation(result.text), trainable=False))
            observation = result.text
        elif decision.action is TurnAction.CALL_LIMIT:
            segments.append(Segment(decision.insert_text, trainable=False))
            observation = None
        elif decision.action is TurnAction.EMPTY_CALL:
            return Episode(tuple(segments), calls, "empty_call")
        else:
            return Episode(tuple(segments), calls, "answer")
    return Episode(tuple(segments), calls, "max_turns")
