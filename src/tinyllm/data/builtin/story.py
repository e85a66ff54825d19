"""The story grammar: a small world changed one event per sentence, then questions about it.

Why it is shaped this way: every random choice goes through a tape (`tape.Tape`) that writes the
chosen text at once. Options are prefix-free at every pick, so the text tells which option was
taken: the document is uniquely decodable and the tape's summed log-probability is exactly the
document's. Stopping decisions (end of story, questions or not, another question or not) are picks
too; their texts are " " (go on), "\\n<|im_start|>user\\n" (questions follow) and
"<|endoftext|>" (the end), so the tape's text is exactly `doc.rendered() + "<|endoftext|>"`.
Each question is built from the final world state, so its answer is fixed by the story.
Why facts are told this way (README: Main job, QA by question kind): a question names a character
or an object, and the answer is a word told about it. A colour comes after its object ("She found a
kite in the park. It was red."), where a small model learns to fetch it; told before ("a red kite")
it was answered little better than a guess. And the story itself recalls each kind of fact it asks
about ("Mia, the little dog, went ...", "She looked at the kite. It was red.", "Mia was still
happy."), as it already recalls where someone is ("found a kite in the park"): the model practises
those lookups on every story, not only on the few answer tokens.
"""

from __future__ import annotations

from tinyllm.data.builtin.lexicon import EVENTS, WEATHER_LEAD, Lexicon
from tinyllm.data.builtin.tape import Choice, Tape
from tinyllm.data.document import Document

END = "<|endoftext|>"
_GO_ON, _ASK, _STOP = " ", "\n<|im_start|>user\n", END
_NEXT_QUESTION = "<|im_start|>user\n"
_ANSWER_HEAD = "<|im_end|>\n<|im_start|>assistant\n"
_TURN_END = "<|im_end|>\n"
# Event leads, written right after the subject; prefix-free as a set.
_LEADS = {
    "go": " went to the", "go_with": " and", "find": " found a", "have": " had a",
    "give": " gave the", "leave": " left the", "pick_up": " picked up the", "meet": " met a",
    "felt": " felt", "was_very": " was very", "said": ' said, "', "shouted": ' shouted, "',
    "look": " looked at the", "still": " was still",
}
# Offered beside the leads after a named subject: ", the little dog," then the event.
_APPOSITIVE = ", the"


class _Char:
    __slots__ = ("name", "pronoun", "trait", "kind", "place", "feeling")

    def __init__(self, name: str, pronoun: str, trait: str, kind: str, place: int | None) -> None:
        self.name, self.pronoun, self.trait, self.kind = name, pronoun, trait, kind
        self.place = place
        self.feeling: str | None = None


class _Obj:
    __slots__ = ("noun", "colour", "holder", "place", "finder", "found_at")

    def __init__(self, noun: str, colour: str, holder: _Char, found_at: int | None) -> None:
        self.noun, self.colour, self.holder = noun, colour, holder
        self.place: int | None = None  # where it lies while nobody holds it
        self.finder = holder if found_at is not None else None
        self.found_at = found_at


class _World:
    __slots__ = ("chars", "objs", "gifts", "last")

    def __init__(self) -> None:
        self.chars: list[_Char] = []
        self.objs: list[_Obj] = []
        self.gifts: list[tuple[_Char, _Char, _Obj]] = []
        self.last: _Char | None = None  # the previous sentence's subject: "she"/"he" means them


class Grammar:
    """A Lexicon compiled into the fixed `Choice`s and lookup lists the generator uses."""

    def __init__(self, lex: Lexicon) -> None:
        self.lex = lex
        self.opening = Choice(lex.openings)
        self.trait = Choice([" " + t for t in lex.traits])
        self.colour = Choice([" " + c for c in lex.colours])
        self.feeling = Choice([" " + f for f in lex.feelings])
        self.weather = Choice([" " + w for w in lex.weathers])
        self.utterance = Choice([u + '"' for u in lex.utterances])
        # (" kind", kind, names it allows), and each name's pronoun.
        self.kinds = [(" " + k, k, [n for n, p in lex.names if pron in (None, p)]) for k, pron in lex.kinds]
        self.pronoun = dict(lex.names)
        # Place options with the current place left out (key None: nowhere yet).
        self.place_text = [" " + p for _, p in lex.places]
        self.place_at = [f" {prep} the {p}." for prep, p in lex.places]
        self.place_answer = [f"{prep.capitalize()} the {p}." for prep, p in lex.places]
        n = len(lex.places)
        self.places_except = {
            ex: [i for i in range(n) if i != ex] for ex in [None, *range(n)]
        }
        self.event_weight = [(e, lex.events[e]) for e in EVENTS if lex.events[e] > 0]
        more = lex.more_question_prob
        # None when there is nothing to choose (probability 0 or 1): `_questions` just writes.
        self.more = Choice([_NEXT_QUESTION, END], [more, 1 - more]) if 0 < more < 1 else None
        self.ends = [self._ends(n) for n in range(lex.max_sentences + 1)]

    def _ends(self, n: int) -> Choice:
        """The pick after sentence n: go on, stop with questions, or stop."""
        lex, q = self.lex, self.lex.qa_share
        go_on = 1.0 if n < lex.min_sentences else 0.0 if n >= lex.max_sentences else 1 - lex.stop_prob
        options = [(_GO_ON, go_on), (_ASK, (1 - go_on) * q), (_STOP, (1 - go_on) * (1 - q))]
        options = [(t, w) for t, w in options if w > 0]
        return Choice([t for t, _ in options], [w for _, w in options])


def generate(tape: Tape, g: Grammar) -> Document:
    """One document: the story, then maybe questions. All randomness goes through `tape`."""
    w = _World()
    _intro(tape, g, w)
    n = 1
    while True:
        end = g.ends[n]
        how = end.texts[tape.pick(end)]
        if how == _GO_ON:
            _sentence(tape, g, w)
            n += 1
            continue
        story = "".join(tape.parts[:-1])
        if how == _STOP:
            return Document(text=story, messages=None, logprob=tape.logprob)
        messages = _questions(tape, g, w)
        return Document(text=story + "\n", messages=messages, logprob=tape.logprob)


def _intro(tape: Tape, g: Grammar, w: _World) -> None:
    tape.pick(g.opening)
    tape.say(" there was a")
    w.chars.append(_new_char(tape, g, w, place=None))
    tape.say(".")


def _new_char(tape: Tape, g: Grammar, w: _World, place: int | None) -> _Char:
    """'{trait} {kind} named {Name}': a character with a name not yet in the story."""
    trait = g.lex.traits[tape.pick(g.trait)]
    used = {c.name for c in w.chars}
    # Only kinds with a name left: a kind is never chosen into a dead end.
    kinds = [k for k in g.kinds if not used.issuperset(k[2])] if used else g.kinds
    _, kind, pool = kinds[tape.uniform([k[0] for k in kinds])]
    tape.say(" named")
    names = [n for n in pool if n not in used] if used else pool
    name = names[tape.uniform([" " + n for n in names])]
    return _Char(name, g.pronoun[name], trait, kind, place)


def _sentence(tape: Tape, g: Grammar, w: _World) -> None:
    """One sentence: who it is about (or the weather), then an event for them."""
    lex, last = g.lex, w.last
    texts = [c.name for c in w.chars]
    weights = [lex.name_weight] * len(texts)
    if last is not None:
        texts.append(last.pronoun.capitalize())
        weights.append(lex.pronoun_weight)
    subjects = len(texts)
    if lex.connective_weight > 0:
        texts += lex.connectives
        weights += [lex.connective_weight] * len(lex.connectives)
    if lex.weather_weight > 0:
        texts.append(WEATHER_LEAD)
        weights.append(lex.weather_weight)
    i = tape.weighted(texts, weights)
    if texts[i] == WEATHER_LEAD:
        tape.pick(g.weather)
        tape.say(" day.")
        w.last = None
        return
    if i >= subjects:
        # After a connective: the subject again, lower-case pronoun ("Then she went ...").
        texts = [" " + t for t in texts[:subjects]]
        if last is not None:
            texts[-1] = " " + last.pronoun
        i = tape.weighted(texts, weights[:subjects])
    subject = w.chars[i] if i < len(w.chars) else last
    _event(tape, g, w, subject, named=i < len(w.chars))
    w.last = subject


def _event(tape: Tape, g: Grammar, w: _World, c: _Char, named: bool = False) -> None:
    """An event for subject `c`, among those its state allows; most change the world, "look" and
    "still" restate a fact. A `named` subject may first be described (`_APPOSITIVE`)."""
    others = [d for d in w.chars if d is not c]
    held = [o for o in w.objs if o.holder is c]
    here = c.place
    near = [d for d in others if d.place == here]
    loose = [o for o in w.objs if o.holder is None and o.place == here] if here is not None else []
    moves, room = len(g.places_except[here]) > 0, len(w.objs) < g.lex.max_objects
    can = {
        "go": moves, "go_with": moves and bool(others), "find": room and here is not None,
        "have": room, "give": bool(held and near), "leave": bool(held) and here is not None,
        "pick_up": bool(loose), "meet": len(w.chars) < g.lex.max_characters,
        "felt": True, "was_very": True, "said": True, "shouted": True,
        "look": bool(held or loose), "still": c.feeling is not None,
    }
    events = [ew for ew in g.event_weight if can[ew[0]]]
    leads, weights = [_LEADS[e] for e, _ in events], [wt for _, wt in events]
    if named and g.lex.appositive_weight > 0:
        i = tape.weighted([*leads, _APPOSITIVE], [*weights, g.lex.appositive_weight])
    else:
        i = tape.weighted(leads, weights)
    if i == len(leads):  # ", the little dog," then the event
        tape.say(f" {c.trait} {c.kind},")
        i = tape.weighted(leads, weights)
    e = events[i][0]
    if e == "look":
        obj = (held + loose)[tape.uniform([" " + o.noun for o in held + loose])]
        tape.say(f". It was {obj.colour}.")
    elif e == "still":
        tape.say(f" {c.feeling}.")
    elif e in ("felt", "was_very"):
        c.feeling = g.lex.feelings[tape.pick(g.feeling)]
        tape.say(".")
    elif e in ("said", "shouted"):
        tape.pick(g.utterance)
    elif e in ("go", "go_with"):
        movers = [c]
        if e == "go_with":
            movers.append(others[tape.uniform([" " + d.name for d in others])])
            tape.say(" went to the")
        places = g.places_except[here]
        place = places[tape.uniform([g.place_text[p] for p in places])]
        tape.say(".")
        for m in movers:
            m.place = place
    elif e in ("find", "have"):
        used = {o.noun for o in w.objs}
        nouns = [n for n in g.lex.nouns if n not in used]
        noun = nouns[tape.uniform([" " + n for n in nouns])]
        tape.say((g.place_at[here] if e == "find" else ".") + " It was")
        colour = g.lex.colours[tape.pick(g.colour)]
        tape.say(".")
        w.objs.append(_Obj(noun, colour, c, here if e == "find" else None))
    elif e == "meet":
        w.chars.append(_new_char(tape, g, w, place=here))
        tape.say(".")
    else:
        where = g.place_at[here] if here is not None else ""
        _handle(tape, w, c, e, loose if e == "pick_up" else held, near, where)


def _handle(tape: Tape, w: _World, c: _Char, e: str, objs: list[_Obj], near: list[_Char],
            place_at: str) -> None:
    """The events that move an object already in the story: give, leave, pick up."""
    obj = objs[tape.uniform([f" {o.colour} {o.noun}" for o in objs])]
    if e == "give":
        tape.say(" to")
        to = near[tape.uniform([" " + d.name for d in near])]
        tape.say(".")
        obj.holder = to
        w.gifts.append((c, to, obj))
    elif e == "leave":
        tape.say(place_at)
        obj.holder, obj.place = None, c.place
    else:
        tape.say(".")
        obj.holder, obj.place = c, None


def _questions(tape: Tape, g: Grammar, w: _World) -> tuple[dict, ...]:
    """Questions about the final world, asked in random order without repeats."""
    pool = _facts(g, w)
    messages: list[dict] = []
    while True:
        q, a = pool.pop(tape.uniform([q for q, _ in pool]))
        tape.say(_ANSWER_HEAD + a + _TURN_END)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if len(messages) // 2 >= g.lex.max_questions or not pool or g.lex.more_question_prob == 0:
            tape.say(END)
            return tuple(messages)
        if g.more is None:  # more_question_prob == 1: another question, no choice made
            tape.say(_NEXT_QUESTION)
        elif tape.pick(g.more) == 1:
            return tuple(messages)


def _facts(g: Grammar, w: _World) -> list[tuple[str, str]]:
    """Every (question, answer) the story settles, in a fixed order."""
    facts = []
    for c in w.chars:
        facts.append((f"Who is {c.name}?", f"A {c.trait} {c.kind}."))
        if c.place is not None:
            facts.append((f"Where is {c.name}?", g.place_answer[c.place]))
        if c.feeling is not None:
            facts.append((f"How does {c.name} feel?", f"{c.name} feels {c.feeling}."))
    for o in w.objs:
        facts.append((f"What colour is the {o.noun}?", f"The {o.noun} is {o.colour}."))
        if o.holder is not None:
            facts.append((f"Who has the {o.noun}?", o.holder.name + "."))
        else:
            facts.append((f"Where is the {o.noun}?", g.place_answer[o.place]))
        if o.finder is not None:
            facts.append((f"Where did {o.finder.name} find the {o.noun}?", g.place_answer[o.found_at]))
    pairs = [(giver, to) for giver, to, _ in w.gifts]
    for giver, to, o in w.gifts:
        if pairs.count((giver, to)) == 1:  # else "what did A give to B" has two answers
            facts.append((f"What did {giver.name} give to {to.name}?", f"The {o.colour} {o.noun}."))
    return facts


_GRAMMARS: dict[Lexicon, Grammar] = {}


def grammar(lex: Lexicon) -> Grammar:
    """The compiled grammar of `lex`, built once per lexicon."""
    if lex not in _GRAMMARS:
        _GRAMMARS[lex] = Grammar(lex)
    return _GRAMMARS[lex]
